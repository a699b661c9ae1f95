//! The deployment files in `deploy/`, checked by the tools that will read
//! them, without root and without a cluster:
//!
//! - `leaktrace-node.service`: `systemd-analyze verify` must print nothing
//!   (systemd only warns, exit 0, about an unknown key or a bad value, and
//!   silently drops an unknown capability name), the unit as systemd parses
//!   it (its debug dump) must hold the documented policy, and
//!   `systemd-analyze security --offline` must rate it no worse than now.
//! - `daemonset.yaml`: every document decoded into the Kubernetes API's own
//!   types (k8s-openapi, generated from the API's OpenAPI schema) with any
//!   field those types do not know reported as an error, like a strict
//!   apply; then what the schema cannot say (the selector matches the
//!   pod, every mount has a volume, the capabilities are exactly these).
//! - The three ways to start the daemon (unit, DaemonSet, image) pass it
//!   the same flags.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Container, Namespace, ServiceAccount},
};
use serde::de::DeserializeOwned;
use serde_yaml_ng::Value;

const UNIT: &str = "leaktrace-node.service";
const UNIT_BINARY: &str = "/usr/local/bin/leaktrace";
/// The daemon's flags wherever it runs; only the listen address differs.
const NODE_ARGS: &[&str] = &[
    "node",
    "--listen",
    "LISTEN",
    "--out",
    "/var/lib/leaktrace",
    "--oom-dir",
    "/var/lib/leaktrace/oom",
];
const CAPS: &[&str] = &[
    "BPF",
    "PERFMON",
    "SYS_PTRACE",
    "SYS_RESOURCE",
    "DAC_READ_SEARCH",
];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read_deploy(name: &str) -> String {
    let path = deploy_dir().join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn node_args(listen: &str) -> Vec<String> {
    NODE_ARGS
        .iter()
        .map(|a| if *a == "LISTEN" { listen } else { a }.to_string())
        .collect()
}

fn text(out: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A copy of the unit in a temporary directory whose ExecStart names an
/// executable stub instead of /usr/local/bin/leaktrace, which verify
/// insists exists; removed on drop.
struct UnitCopy {
    dir: PathBuf,
}

impl UnitCopy {
    fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("leaktrace-deploy-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create the unit's directory");
        let stub = dir.join("leaktrace");
        fs::write(&stub, "#!/bin/sh\n").expect("write the stub");
        let st = Command::new("chmod")
            .arg("755")
            .arg(&stub)
            .status()
            .expect("run chmod");
        assert!(st.success(), "chmod the stub: {st}");
        let unit = read_deploy(UNIT);
        let exec: Vec<&str> = unit
            .lines()
            .filter(|l| l.starts_with("ExecStart="))
            .collect();
        assert_eq!(
            exec,
            [format!(
                "ExecStart={UNIT_BINARY} {}",
                node_args("127.0.0.1:9464").join(" ")
            )],
            "the unit must start exactly the documented command"
        );
        let copy = unit.replace(UNIT_BINARY, &stub.display().to_string());
        fs::write(dir.join(UNIT), copy).expect("write the unit's copy");
        UnitCopy { dir }
    }

    fn unit(&self) -> PathBuf {
        self.dir.join(UNIT)
    }

    fn stub(&self) -> PathBuf {
        self.dir.join("leaktrace")
    }
}

impl Drop for UnitCopy {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn systemd_analyze(args: &[&str], unit: &Path, log_level: &str) -> Output {
    Command::new("systemd-analyze")
        .args(args)
        .arg(unit)
        .env("SYSTEMD_LOG_LEVEL", log_level)
        .env("SYSTEMD_LOG_COLOR", "0")
        .env("SYSTEMD_PAGER", "")
        .output()
        .unwrap_or_else(|e| {
            panic!("systemd-analyze is needed by this test (apt-get install systemd): {e}")
        })
}

#[test]
fn systemd_unit_verifies_without_a_word() {
    let copy = UnitCopy::new("verify");
    let out = systemd_analyze(&["verify"], &copy.unit(), "info");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "systemd-analyze verify {UNIT}: {}",
        text(&out)
    );
}

/// The unit's settings from systemd's own dump of it (`verify` at debug
/// level): `key -> values`, a key given twice keeping both.
fn parsed_unit(copy: &UnitCopy) -> BTreeMap<String, Vec<String>> {
    let out = systemd_analyze(&["verify"], &copy.unit(), "debug");
    assert!(
        out.status.success(),
        "systemd-analyze verify: {}",
        text(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let header = format!("-> Unit {UNIT}:");
    let mut lines = stdout.lines().skip_while(|l| l.trim() != header);
    assert!(lines.next().is_some(), "no dump of {UNIT}: {}", text(&out));
    let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut in_exec = false;
    for line in lines {
        // The unit's own settings are indented two tabs; the next unit's
        // header one.
        let Some(body) = line.strip_prefix("\t\t") else {
            break;
        };
        if let Some(cmd) = body.strip_prefix("\tCommand Line: ") {
            if in_exec {
                settings
                    .entry("ExecStart".into())
                    .or_default()
                    .push(cmd.to_string());
            }
            continue;
        }
        in_exec = body.trim() == "-> ExecStart:";
        if let Some((k, v)) = body.split_once(": ") {
            settings
                .entry(k.to_string())
                .or_default()
                .push(v.trim().to_string());
        }
    }
    settings
}

#[test]
fn systemd_unit_parses_to_the_documented_policy() {
    let copy = UnitCopy::new("policy");
    let settings = parsed_unit(&copy);
    let get = |k: &str| -> Vec<String> {
        settings
            .get(k)
            .cloned()
            .unwrap_or_else(|| panic!("systemd's dump has no {k}: {settings:#?}"))
    };
    // systemd drops a capability name it does not know without a warning:
    // only its parse shows that all five arrived.
    let mut want_caps: Vec<String> = CAPS
        .iter()
        .map(|c| format!("cap_{}", c.to_lowercase()))
        .collect();
    want_caps.sort();
    for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        let mut caps: Vec<String> = get(key)
            .join(" ")
            .split_whitespace()
            .map(str::to_string)
            .collect();
        caps.sort();
        assert_eq!(caps, want_caps, "{key}");
    }
    let mut want_exec = vec![copy.stub().display().to_string()];
    want_exec.extend(node_args("127.0.0.1:9464"));
    for (key, want) in [
        ("Type", vec!["simple".to_string()]),
        ("Restart", vec!["on-failure".into()]),
        ("ExecStart", vec![want_exec.join(" ")]),
        (
            "StateDirectory",
            vec!["leaktrace".into(), "leaktrace/oom".into()],
        ),
        ("ProtectSystem", vec!["strict".into()]),
        ("ProtectHome", vec!["read-only".into()]),
        ("PrivateTmp", vec!["yes".into()]),
        // What would hide the processes and files the daemon reads.
        ("ProtectProc", vec!["default".into()]),
        ("ProcSubset", vec!["all".into()]),
        ("PrivateUsers", vec!["no".into()]),
        ("PrivateNetwork", vec!["no".into()]),
        ("Nice", vec!["10".into()]),
        // CPUQuota=5% is 50 ms of CPU time per second.
        ("CPUQuotaPerSecSec", vec!["50ms".into()]),
        ("MemoryMax", vec![(256u64 << 20).to_string()]),
        ("LimitMEMLOCK", vec![u64::MAX.to_string()]),
        ("StandardError", vec!["journal".into()]),
    ] {
        assert_eq!(get(key), want, "{key}");
    }
}

/// systemd's exposure score (0-100, printed as 0.0-10.0) of the unit as
/// written: any loosening fails here, so it has to come with its reason.
const MAX_EXPOSURE: &str = "31";

#[test]
fn systemd_unit_exposure_stays_low() {
    let copy = UnitCopy::new("security");
    let out = systemd_analyze(
        &[
            "security",
            "--offline=true",
            &format!("--threshold={MAX_EXPOSURE}"),
            "--no-pager",
        ],
        &copy.unit(),
        "info",
    );
    let report = text(&out);
    assert!(
        out.status.success(),
        "systemd-analyze security rates {UNIT} above {MAX_EXPOSURE}: {report}"
    );
    // The settings the dump does not show.
    for passed in [
        "✓ NoNewPrivileges=",
        "✓ CapabilityBoundingSet=~CAP_SYS_ADMIN",
        "✓ ProtectKernelTunables=",
        "✓ ProtectControlGroups=",
        "✓ MemoryDenyWriteExecute=",
    ] {
        assert!(report.contains(passed), "{passed} missing: {report}");
    }
}

/// The manifest's documents, each with its `kind`.
fn manifest(src: &str) -> Vec<(String, Value)> {
    let mut docs = Vec::new();
    for de in serde_yaml_ng::Deserializer::from_str(src) {
        let doc = <Value as serde::Deserialize>::deserialize(de)
            .unwrap_or_else(|e| panic!("deploy/daemonset.yaml is not YAML: {e}"));
        let kind = doc
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("a document without kind: {doc:?}"))
            .to_string();
        docs.push((kind, doc));
    }
    docs
}

/// Decode `doc` as `T`; every field `T` does not know is an error, as is
/// a wrong type, a wrong apiVersion or a wrong kind.
fn strict<T: DeserializeOwned>(doc: Value) -> Result<T, String> {
    let mut unknown = Vec::new();
    let decoded = serde_ignored::deserialize(doc, |path| unknown.push(path.to_string()))
        .map_err(|e| e.to_string())?;
    if unknown.is_empty() {
        Ok(decoded)
    } else {
        Err(format!("unknown fields: {}", unknown.join(", ")))
    }
}

struct Objects {
    namespace: Namespace,
    account: ServiceAccount,
    daemonset: DaemonSet,
}

fn decode(src: &str) -> Result<Objects, String> {
    let docs = manifest(src);
    let kinds: Vec<&str> = docs.iter().map(|(k, _)| k.as_str()).collect();
    // Namespace first: `kubectl apply -f` creates in file order.
    if kinds != ["Namespace", "ServiceAccount", "DaemonSet"] {
        return Err(format!("documents {kinds:?}"));
    }
    let mut docs = docs.into_iter().map(|(_, d)| d);
    let mut next = || docs.next().ok_or("a document went missing");
    Ok(Objects {
        namespace: strict(next()?).map_err(|e| format!("Namespace: {e}"))?,
        account: strict(next()?).map_err(|e| format!("ServiceAccount: {e}"))?,
        daemonset: strict(next()?).map_err(|e| format!("DaemonSet: {e}"))?,
    })
}

#[test]
fn manifest_decodes_strictly_into_the_api_types() {
    let objects = decode(&read_deploy("daemonset.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let ns = objects.namespace.metadata.name.as_deref();
    assert_eq!(ns, Some("leaktrace"));
    assert_eq!(objects.account.metadata.namespace.as_deref(), ns);
    assert_eq!(objects.daemonset.metadata.namespace.as_deref(), ns);
    assert_eq!(
        objects
            .namespace
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("pod-security.kubernetes.io/enforce"))
            .map(String::as_str),
        Some("privileged"),
        "Pod Security must admit hostPID, hostPath and the capabilities"
    );

    let spec = objects.daemonset.spec.expect("DaemonSet.spec");
    let pod_meta = spec.template.metadata.expect("template.metadata");
    let labels = pod_meta.labels.unwrap_or_default();
    let selector = spec.selector.match_labels.unwrap_or_default();
    assert!(!selector.is_empty(), "an empty selector");
    for (k, v) in &selector {
        assert_eq!(labels.get(k), Some(v), "selector {k}={v} misses the pod");
    }

    let pod = spec.template.spec.expect("template.spec");
    assert_eq!(pod.host_pid, Some(true));
    assert_eq!(
        pod.service_account_name, objects.account.metadata.name,
        "the pod runs as the manifest's account"
    );
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerations = pod.tolerations.unwrap_or_default();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "a toleration of every taint: {tolerations:?}"
    );

    let [c]: [Container; 1] = pod
        .containers
        .try_into()
        .unwrap_or_else(|v: Vec<Container>| panic!("{} containers", v.len()));
    assert_eq!(c.image.as_deref(), Some("leaktrace:latest"));
    assert_eq!(c.args.as_deref(), Some(&node_args("0.0.0.0:9464")[..]));

    let port = c
        .ports
        .unwrap_or_default()
        .into_iter()
        .find(|p| p.container_port == 9464)
        .expect("container port 9464");
    assert_eq!(port.name.as_deref(), Some("metrics"));
    let annotations = pod_meta.annotations.unwrap_or_default();
    for (k, v) in [
        ("prometheus.io/scrape", "true"),
        ("prometheus.io/port", "9464"),
        ("prometheus.io/path", "/metrics"),
    ] {
        assert_eq!(annotations.get(k).map(String::as_str), Some(v), "{k}");
    }

    let res = c.resources.expect("resources");
    for (which, got) in [("requests", res.requests), ("limits", res.limits)] {
        let got = got.unwrap_or_default();
        for key in ["cpu", "memory"] {
            assert!(got.contains_key(key), "resources.{which}.{key}");
        }
    }

    let sc = c.security_context.expect("securityContext");
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let caps = sc.capabilities.expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let mut added = caps.add.unwrap_or_default();
    added.sort();
    let mut want: Vec<String> = CAPS.iter().map(|c| c.to_string()).collect();
    want.sort();
    assert_eq!(added, want, "capabilities.add");
    assert_eq!(
        sc.seccomp_profile.map(|p| p.type_).as_deref(),
        Some("Unconfined")
    );
    assert_eq!(
        sc.app_armor_profile.map(|p| p.type_).as_deref(),
        Some("Unconfined")
    );

    let volumes: BTreeMap<String, _> = pod
        .volumes
        .unwrap_or_default()
        .into_iter()
        .map(|v| (v.name.clone(), v))
        .collect();
    let mut mounted = BTreeMap::new();
    for m in c.volume_mounts.unwrap_or_default() {
        let v = volumes
            .get(&m.name)
            .unwrap_or_else(|| panic!("mount {} has no volume", m.name));
        if let Some(host) = &v.host_path {
            mounted.insert(host.path.clone(), (m.mount_path.clone(), m.read_only));
        }
    }
    assert_eq!(
        mounted.get("/sys/kernel/btf"),
        Some(&("/sys/kernel/btf".to_string(), Some(true)))
    );
    assert_eq!(
        mounted.get("/sys/fs/cgroup"),
        Some(&("/sys/fs/cgroup".to_string(), Some(true)))
    );
    let (state, ro) = mounted
        .get("/var/lib/leaktrace")
        .expect("the node's /var/lib/leaktrace");
    assert_ne!(*ro, Some(true), "--out needs a writable mount");
    for dir in ["/var/lib/leaktrace", "/var/lib/leaktrace/oom"] {
        assert!(
            Path::new(dir).starts_with(state),
            "{dir} is not on the node"
        );
    }
    assert!(
        !mounted.keys().any(|p| p.starts_with("/sys/kernel/debug")),
        "uprobes go through perf_event_open: no debugfs"
    );
}

/// The check must refuse what the API would: a misspelt field, a field in
/// the wrong place, a wrong type, a wrong apiVersion.
#[test]
fn manifest_check_refuses_what_the_api_refuses() {
    let good = read_deploy("daemonset.yaml");
    for (from, to, want) in [
        (
            "readOnlyRootFilesystem: true",
            "readOnlyRootFileSystem: true",
            "readOnlyRootFileSystem",
        ),
        ("hostPID: true", "hostPid: true", "hostPid"),
        (
            "containerPort: 9464",
            "containerPort: metrics-port",
            "invalid type",
        ),
        (
            "apiVersion: apps/v1",
            "apiVersion: apps/v1beta2",
            "apps/v1beta2",
        ),
        (
            "      enableServiceLinks: false",
            "      enableServiceLinks: false\n      readOnly: true",
            "readOnly",
        ),
    ] {
        assert!(good.contains(from), "the manifest no longer has {from:?}");
        let bad = good.replacen(from, to, 1);
        match decode(&bad) {
            Ok(_) => panic!("{from:?} -> {to:?} passed the check"),
            Err(e) => assert!(e.contains(want), "{from:?} -> {to:?}: {e}"),
        }
    }
}

#[test]
fn image_and_unit_start_the_daemon_with_the_same_flags() {
    let dockerfile = read_deploy("Dockerfile");
    let cmd = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("CMD "))
        .expect("a CMD line");
    let cmd: Vec<String> = serde_json::from_str(cmd).expect("CMD in exec form");
    assert_eq!(cmd, node_args("0.0.0.0:9464"));
    assert!(dockerfile.contains("\nENTRYPOINT [\"/usr/local/bin/leaktrace\"]\n"));
    assert!(dockerfile.contains("\nFROM debian:bookworm-slim\n"));
    assert!(dockerfile.contains("\nCOPY target/release/leaktrace /usr/local/bin/leaktrace\n"));
    let ignore = read_deploy("Dockerfile.dockerignore");
    assert!(
        ignore.lines().any(|l| l == "!target/release/leaktrace"),
        "the build context must keep the binary"
    );
}
