//! Which container (or systemd unit) a process runs in, from its cgroup.
//!
//! Input: a cgroup path as `/proc/PID/cgroup` shows it (`/docker/<id>`,
//! `/system.slice/docker-<id>.scope`, ...; a leading `ID:controllers:` of
//! the whole line is tolerated). Output: a [`Container`], or `None` for the
//! root cgroup, slices and shapes this module does not know.
//!
//! Pure string work, no I/O. The innermost recognisable component wins, so
//! a container nested in another (docker in docker, a scope delegated
//! inside a service) is named by its own id. Kubernetes pod uids are
//! normalised to the dashed form the API server uses: the systemd cgroup
//! driver writes them with underscores (`pod1234_5678.slice`) because `-`
//! separates slice levels.

use serde::Serialize;

/// A container runtime's container, or a systemd unit outside containers.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Container {
    /// `docker`, `containerd`, `cri-o`, `podman`, or `systemd` for a plain
    /// unit (a service, a session or user scope) that is not a container.
    pub runtime: &'static str,
    /// The runtime's container id (64 hex digits); empty for `systemd`.
    pub id: String,
    /// The Kubernetes pod uid, dashed, when the cgroup is under a pod.
    pub pod_uid: Option<String>,
    /// The systemd unit that holds the process: the service or scope of a
    /// plain unit, or the container's own scope under the systemd cgroup
    /// driver (`docker-<id>.scope`); `None` under the cgroupfs driver.
    pub unit: Option<String>,
}

/// Runtimes that name a container's cgroup `<prefix><id>` (with `.scope`
/// under the systemd driver, without under cgroupfs).
const PREFIXES: &[(&str, &str)] = &[
    ("docker-", "docker"),
    ("cri-containerd-", "containerd"),
    ("crio-", "cri-o"),
    ("libpod-", "podman"),
];

/// The container or unit of the process in cgroup `path`.
pub fn from_cgroup_path(path: &str) -> Option<Container> {
    let path = strip_line_prefix(path.trim());
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let pod_uid = parts.iter().find_map(|p| pod_uid(p));
    for (i, part) in parts.iter().enumerate().rev() {
        let parent = if i > 0 { parts[i - 1] } else { "" };
        if let Some((runtime, id)) = container_part(part, parent) {
            return Some(Container {
                runtime,
                id: id.to_string(),
                pod_uid,
                unit: part.ends_with(".scope").then(|| part.to_string()),
            });
        }
    }
    // Not a container: the innermost unit. Slices only group units, and a
    // process never sits in a slice itself on a systemd host.
    let unit = parts
        .iter()
        .rev()
        .find(|p| p.ends_with(".service") || p.ends_with(".scope"))?;
    Some(Container {
        runtime: "systemd",
        id: String::new(),
        pod_uid,
        unit: Some(unit.to_string()),
    })
}

/// `0::/a/b` (a whole line of `/proc/PID/cgroup`) -> `/a/b`.
fn strip_line_prefix(s: &str) -> &str {
    if s.starts_with('/') {
        return s;
    }
    let mut it = s.splitn(3, ':');
    match (it.next(), it.next(), it.next()) {
        (Some(_), Some(_), Some(rest)) => rest,
        _ => s,
    }
}

/// The runtime and id a single path component names, if it names one.
fn container_part<'a>(part: &'a str, parent: &str) -> Option<(&'static str, &'a str)> {
    let bare = part.strip_suffix(".scope").unwrap_or(part);
    for (prefix, runtime) in PREFIXES {
        if let Some(id) = bare.strip_prefix(prefix) {
            // `crio-conmon-<id>` and `libpod-conmon-<id>` hold the
            // runtime's monitor, not the container: they fail the id test
            // and fall through to a plain unit.
            return is_container_id(id).then_some((*runtime, id));
        }
    }
    if !is_container_id(part) {
        return None;
    }
    // A bare id: its parent tells the runtime. Under a Kubernetes pod with
    // the cgroupfs driver the id has no prefix whatever the runtime;
    // containerd is the default runtime there, and dockershim nodes show
    // the same shape.
    if parent == "docker" {
        Some(("docker", part))
    } else if pod_uid(parent).is_some() {
        Some(("containerd", part))
    } else if parent == "libpod_parent" {
        Some(("podman", part))
    } else {
        None
    }
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The pod uid a component names: `pod<uid>` (cgroupfs driver) or
/// `kubepods[-<qos>]-pod<uid_with_underscores>.slice` (systemd driver).
fn pod_uid(part: &str) -> Option<String> {
    let uid = if let Some(slice) = part.strip_suffix(".slice") {
        if !slice.starts_with("kubepods") {
            return None;
        }
        slice.rsplit_once("-pod")?.1
    } else {
        part.strip_prefix("pod")?
    };
    // Dashed uuids from the API server, or the hex hash of a static pod.
    let ok = !uid.is_empty()
        && uid
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b'-' || b == b'_');
    ok.then(|| uid.replace('_', "-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f5e7c6d2a1b4c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d";
    const UID: &str = "1a2b3c4d-5e6f-7a8b-9c0d-1e2f3a4b5c6d";
    const UID_: &str = "1a2b3c4d_5e6f_7a8b_9c0d_1e2f3a4b5c6d";

    fn container(runtime: &'static str, pod: bool, unit: Option<String>) -> Container {
        Container {
            runtime,
            id: ID.to_string(),
            pod_uid: pod.then(|| UID.to_string()),
            unit,
        }
    }

    fn unit(name: &str) -> Container {
        Container {
            runtime: "systemd",
            id: String::new(),
            pod_uid: None,
            unit: Some(name.to_string()),
        }
    }

    #[test]
    fn docker_cgroupfs_v1_and_systemd_v2() {
        assert_eq!(
            from_cgroup_path(&format!("/docker/{ID}")),
            Some(container("docker", false, None))
        );
        let scope = format!("docker-{ID}.scope");
        assert_eq!(
            from_cgroup_path(&format!("/system.slice/{scope}")),
            Some(container("docker", false, Some(scope.clone())))
        );
        // A whole line of /proc/PID/cgroup, v2 and v1.
        assert_eq!(
            from_cgroup_path(&format!("0::/system.slice/{scope}")),
            Some(container("docker", false, Some(scope)))
        );
        assert_eq!(
            from_cgroup_path(&format!("4:memory:/docker/{ID}\n")),
            Some(container("docker", false, None))
        );
    }

    #[test]
    fn kubernetes_cgroupfs_driver() {
        for qos in ["burstable/", "besteffort/", ""] {
            let path = format!("/kubepods/{qos}pod{UID}/{ID}");
            assert_eq!(
                from_cgroup_path(&path),
                Some(container("containerd", true, None)),
                "{path}"
            );
        }
        let path = format!("/kubepods/burstable/pod{UID}/crio-{ID}");
        assert_eq!(
            from_cgroup_path(&path),
            Some(container("cri-o", true, None))
        );
    }

    #[test]
    fn kubernetes_systemd_driver() {
        let scope = format!("cri-containerd-{ID}.scope");
        for (qos_slice, pod_slice) in [
            (
                "kubepods-burstable.slice/",
                format!("kubepods-burstable-pod{UID_}.slice"),
            ),
            (
                "kubepods-besteffort.slice/",
                format!("kubepods-besteffort-pod{UID_}.slice"),
            ),
            ("", format!("kubepods-pod{UID_}.slice")),
        ] {
            let path = format!("/kubepods.slice/{qos_slice}{pod_slice}/{scope}");
            assert_eq!(
                from_cgroup_path(&path),
                Some(container("containerd", true, Some(scope.clone()))),
                "{path}"
            );
        }
        let crio = format!("crio-{ID}.scope");
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/{crio}"
        );
        assert_eq!(
            from_cgroup_path(&path),
            Some(container("cri-o", true, Some(crio)))
        );
    }

    #[test]
    fn cri_o_monitor_is_a_unit_of_the_pod_not_the_container() {
        let conmon = format!("crio-conmon-{ID}.scope");
        let path = format!("/kubepods.slice/kubepods-pod{UID_}.slice/{conmon}");
        let got = from_cgroup_path(&path).expect("a unit");
        assert_eq!(got.runtime, "systemd");
        assert_eq!(got.id, "");
        assert_eq!(got.pod_uid.as_deref(), Some(UID));
        assert_eq!(got.unit, Some(conmon));
    }

    #[test]
    fn static_pod_uid_without_dashes() {
        let uid = "0123456789abcdef0123456789abcdef";
        let got = from_cgroup_path(&format!("/kubepods/pod{uid}/{ID}")).expect("container");
        assert_eq!(got.pod_uid.as_deref(), Some(uid));
    }

    #[test]
    fn podman_rootful_rootless_and_cgroupfs() {
        let scope = format!("libpod-{ID}.scope");
        assert_eq!(
            from_cgroup_path(&format!("/machine.slice/{scope}")),
            Some(container("podman", false, Some(scope.clone())))
        );
        // A container running systemd: the payload sits one level down.
        assert_eq!(
            from_cgroup_path(&format!("/machine.slice/{scope}/container")),
            Some(container("podman", false, Some(scope.clone())))
        );
        let rootless = format!("/user.slice/user-1000.slice/user@1000.service/user.slice/{scope}");
        assert_eq!(
            from_cgroup_path(&rootless),
            Some(container("podman", false, Some(scope)))
        );
        assert_eq!(
            from_cgroup_path(&format!("/libpod_parent/libpod-{ID}")),
            Some(container("podman", false, None))
        );
    }

    #[test]
    fn innermost_container_wins() {
        let inner = ID.replace('3', "4");
        let got = from_cgroup_path(&format!("/docker/{ID}/docker/{inner}")).expect("container");
        assert_eq!(got.id, inner);
    }

    #[test]
    fn systemd_services_and_user_sessions() {
        assert_eq!(
            from_cgroup_path("/system.slice/nginx.service"),
            Some(unit("nginx.service"))
        );
        assert_eq!(
            from_cgroup_path("/system.slice/system-getty.slice/getty@tty1.service"),
            Some(unit("getty@tty1.service"))
        );
        // Delegated subtree: the service still names it.
        assert_eq!(
            from_cgroup_path("/system.slice/buildkit.service/payload"),
            Some(unit("buildkit.service"))
        );
        // The daemons themselves are units, not containers.
        assert_eq!(
            from_cgroup_path("/system.slice/docker.service"),
            Some(unit("docker.service"))
        );
        assert_eq!(
            from_cgroup_path("/system.slice/docker-compose@app.service"),
            Some(unit("docker-compose@app.service"))
        );
        assert_eq!(
            from_cgroup_path("/user.slice/user-1000.slice/session-3.scope"),
            Some(unit("session-3.scope"))
        );
        assert_eq!(
            from_cgroup_path(
                "/user.slice/user-1000.slice/user@1000.service/app.slice/app-gnome-firefox-4242.scope"
            ),
            Some(unit("app-gnome-firefox-4242.scope"))
        );
        assert_eq!(from_cgroup_path("/init.scope"), Some(unit("init.scope")));
        // A scope named like a container's without an id is just a scope.
        assert_eq!(
            from_cgroup_path("/system.slice/docker-notanid.scope"),
            Some(unit("docker-notanid.scope"))
        );
    }

    #[test]
    fn root_slices_and_unknown_shapes_are_none() {
        for path in [
            "",
            "/",
            "0::/",
            "/user.slice",
            "/user.slice/user-1000.slice",
            "/kubepods.slice/kubepods-burstable.slice",
            &format!("/kubepods/burstable/pod{UID}"),
            &format!("/default/{ID}"),
            "/docker/abc",
            &format!("/docker/{}", &ID[..63]),
            &format!("/docker/{}x", &ID[..63]),
            "/lxc/web1",
        ] {
            assert_eq!(from_cgroup_path(path), None, "{path}");
        }
    }

    #[test]
    fn pod_uid_shapes() {
        assert_eq!(pod_uid(&format!("pod{UID}")).as_deref(), Some(UID));
        assert_eq!(
            pod_uid(&format!("kubepods-burstable-pod{UID_}.slice")).as_deref(),
            Some(UID)
        );
        assert_eq!(pod_uid("pod"), None);
        assert_eq!(pod_uid("podman.service"), None);
        assert_eq!(pod_uid("other-pod1234.slice"), None);
    }
}
