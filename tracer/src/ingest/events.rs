//! Reading the kernel-side ledger: per-stack totals, stack traces and loss
//! counters, as plain types for the stages after it.

use std::collections::HashMap;

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap};
use tracer_common::{maps, Counter, StackBuf, StackId, StackKey, StackTotals, STACK_LOST};

use crate::attach::probe::Probes;

/// Counters summed over CPUs, indexed by [`Counter`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub HashMap<&'static str, u64>);

impl Counters {
    pub fn get(&self, c: Counter) -> u64 {
        self.0.get(c.name()).copied().unwrap_or(0)
    }

    /// Events that could not be recorded, all causes together.
    pub fn lost(&self) -> u64 {
        Counter::ALL
            .iter()
            .filter(|c| c.is_loss())
            .map(|c| self.get(*c))
            .sum()
    }

    /// Whether allocator entries and returns fail to pair on this kernel,
    /// in words for the report: a nested call is rare (calloc -> malloc),
    /// and a missed return is an accident (longjmp, attach mid-call), so
    /// either outnumbering recorded allocations many times over means the
    /// kernel does not deliver the return probes as expected, and the
    /// figures are wrong. `None` when pairing looks healthy.
    pub fn pairing_problem(&self, kernel: &str) -> Option<String> {
        let recorded = self.get(Counter::Allocs) + self.get(Counter::FailedAllocs);
        let worst = [
            Counter::Nested,
            Counter::MissingReturn,
            Counter::MissingEntry,
        ]
        .into_iter()
        .map(|c| (c, self.get(c)))
        .max_by_key(|(_, n)| *n)?;
        let (counter, n) = worst;
        if n < 1000 || n < 20 * (recorded + 1) {
            return None;
        }
        Some(format!(
            "WARNING: allocator calls do not pair with their returns on this kernel (Linux \
             {kernel}): {n} {} against {recorded} allocations recorded; the figures in this \
             report are wrong. Please report this with the output of `leaktrace --version`",
            counter.name()
        ))
    }
}

/// What a loss counter means for the figures, in a few words.
pub fn loss_meaning(c: Counter) -> &'static str {
    match c {
        Counter::MissingEntry => {
            "returns whose entry was not seen (calls already running at attach, or in a \
             process forked mid-call): those blocks are not counted"
        }
        Counter::MissingReturn => {
            "calls whose return never came (longjmp, or a return probe attached while the \
             call ran): those blocks are not counted"
        }
        Counter::StaleReplaced => {
            "blocks freed by a path leaktrace does not probe, then reused: counted as freed"
        }
        Counter::PendingMapFull => "calls displaced from the pending-call table: not counted",
        Counter::AllocsMapFull => {
            "blocks not recorded: the live-block table is full (--max-allocs)"
        }
        Counter::StackTotalsMapFull | Counter::StackCollision => {
            "stacks not recorded: the stack table is full (--max-stacks)"
        }
        Counter::StackLost => "blocks recorded without their stack",
        Counter::EventsLost => "memory syscalls lost: the ring buffer was full",
        Counter::UnwindAborted => "stacks cut while being recorded: those blocks are not counted",
        _ => "",
    }
}

/// A recorded stack as plain data.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawStack {
    /// Return addresses, innermost first.
    pub ips: Vec<u64>,
    /// One of `tracer_common::stop`.
    pub stop: u32,
    /// The interpreter's frames, for a process whose runtime's walker ran.
    pub interp: RawInterp,
}

/// Interpreter frames as one runtime's kernel walker recorded them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawInterp {
    /// One of `tracer_common::runtime` (`NONE`: no walk).
    pub runtime: u32,
    /// Innermost first.
    pub frames: Vec<RawInterpFrame>,
    /// Why the walk ended, in the runtime's terms (`py_stop` for Python).
    pub stop: u32,
}

pub use crate::runtime::RawInterpFrame;

/// The runtimes' records in the kernel, read for `runtime::Runtimes::rows`.
impl crate::runtime::KernelRecords for Probes {
    fn go_buckets(&self) -> Result<Vec<(tracer_common::GoBucketKey, StackTotals)>, String> {
        self.read_go().map_err(|e| e.to_string())
    }
}

impl RawStack {
    pub fn from_buf(buf: &StackBuf) -> Self {
        let len = (buf.len as usize).min(buf.ips.len());
        let it = &buf.interp;
        let n = (it.len as usize).min(it.code.len());
        Self {
            ips: buf.ips[..len].to_vec(),
            stop: buf.stop,
            interp: RawInterp {
                runtime: it.runtime,
                frames: (0..n)
                    .map(|i| RawInterpFrame {
                        code: it.code[i],
                        pos: it.pos[i] as i32,
                        entry: it.entry_mask & (1 << i) != 0,
                    })
                    .collect(),
                stop: it.stop,
            },
        }
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One stack's totals over the CPUs' shares (each CPU keeps its own; a
/// block freed on another CPU than it was allocated on makes one share
/// negative, the sum is right).
fn sum_cpus<'a>(shares: impl Iterator<Item = &'a StackTotals>) -> StackTotals {
    shares.fold(StackTotals::default(), |acc, t| StackTotals {
        outstanding_bytes: acc.outstanding_bytes.wrapping_add(t.outstanding_bytes),
        outstanding_allocs: acc.outstanding_allocs.wrapping_add(t.outstanding_allocs),
        total_bytes: acc.total_bytes.wrapping_add(t.total_bytes),
        total_allocs: acc.total_allocs.wrapping_add(t.total_allocs),
    })
}

/// One reading of the per-stack ledger.
#[derive(Clone, Debug, Default)]
pub struct Reading {
    pub rows: Vec<(StackKey, StackTotals)>,
    pub counters: Counters,
}

#[derive(Debug, thiserror::Error)]
#[error("failed to read BPF map {map}: {reason}")]
pub struct ReadError {
    map: &'static str,
    reason: String,
}

fn read_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> ReadError {
    move |e| ReadError {
        map,
        reason: e.to_string(),
    }
}

impl Probes {
    /// Read every `(tgid, stack)` row and the counters.
    pub fn read(&self) -> Result<Reading, ReadError> {
        let map = self.ebpf.map(maps::STACK_TOTALS).ok_or(ReadError {
            map: maps::STACK_TOTALS,
            reason: "missing".into(),
        })?;
        let totals: PerCpuHashMap<&MapData, StackKey, StackTotals> =
            PerCpuHashMap::try_from(map).map_err(read_err(maps::STACK_TOTALS))?;
        let mut rows = Vec::new();
        for item in totals.iter() {
            match item {
                Ok((key, per_cpu)) => rows.push((key, sum_cpus(per_cpu.iter()))),
                // A row deleted while iterating: skip it.
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(read_err(maps::STACK_TOTALS)(e)),
            }
        }
        self.only_survivors(&mut rows)?;
        Ok(Reading {
            rows,
            counters: self.counters()?,
        })
    }

    /// Lua blocks count once they survived a garbage collection cycle:
    /// take from each row what its Lua VMs allocated since the last
    /// atomic phase (and, while a sweep runs, in the cycle before), which
    /// may still be garbage. Without this, garbage awaiting the collector
    /// looks like growth, and the more so as the heap grows (the collector
    /// runs less often).
    fn only_survivors(&self, rows: &mut [(StackKey, StackTotals)]) -> Result<(), ReadError> {
        let (Some(gc), Some(young)) = (self.ebpf.map(maps::LUA_GC), self.ebpf.map(maps::LUA_YOUNG))
        else {
            return Ok(());
        };
        let gc: BpfHashMap<&MapData, u32, tracer_common::LuaGc> =
            BpfHashMap::try_from(gc).map_err(read_err(maps::LUA_GC))?;
        let gcs: HashMap<u32, tracer_common::LuaGc> = gc.iter().filter_map(Result::ok).collect();
        if gcs.is_empty() {
            return Ok(());
        }
        let young: BpfHashMap<&MapData, StackKey, tracer_common::LuaYoung> =
            BpfHashMap::try_from(young).map_err(read_err(maps::LUA_YOUNG))?;
        let young: HashMap<StackKey, tracer_common::LuaYoung> =
            young.iter().filter_map(Result::ok).collect();
        for (key, t) in rows.iter_mut() {
            let (Some(g), Some(y)) = (gcs.get(&key.tgid), young.get(key)) else {
                continue;
            };
            let sweeping = g
                .state
                .iter()
                .any(|s| tracer_common::gc_state::sweeping(*s));
            let (bytes, allocs) = y.young(g.gen, sweeping);
            t.outstanding_bytes -= bytes.clamp(0, t.outstanding_bytes.max(0));
            t.outstanding_allocs -= allocs.clamp(0, t.outstanding_allocs.max(0));
        }
        Ok(())
    }

    /// The Go runtime's sampled objects still live, per `(tgid, bucket)`,
    /// raw (unscaled).
    pub fn read_go(&self) -> Result<Vec<(tracer_common::GoBucketKey, StackTotals)>, ReadError> {
        let Some(map) = self.ebpf.map(maps::GO_BUCKETS) else {
            return Ok(Vec::new());
        };
        let buckets: BpfHashMap<&MapData, tracer_common::GoBucketKey, StackTotals> =
            BpfHashMap::try_from(map).map_err(read_err(maps::GO_BUCKETS))?;
        Ok(buckets.iter().filter_map(Result::ok).collect())
    }

    /// Per-stack totals of live blocks older than `min_age_ns` only, from
    /// the live-allocation table (one pass over it).
    pub fn read_aged(&self, min_age_ns: u64) -> Result<Vec<(StackKey, StackTotals)>, ReadError> {
        let map = self.ebpf.map(maps::ALLOCS).ok_or(ReadError {
            map: maps::ALLOCS,
            reason: "missing".into(),
        })?;
        let allocs: BpfHashMap<&MapData, tracer_common::AllocKey, tracer_common::AllocInfo> =
            BpfHashMap::try_from(map).map_err(read_err(maps::ALLOCS))?;
        let cutoff = monotonic_ns().saturating_sub(min_age_ns);
        let mut acc: HashMap<StackKey, StackTotals> = HashMap::new();
        for (key, info) in allocs.iter().filter_map(Result::ok) {
            if info.ts_ns > cutoff {
                continue;
            }
            let t = acc
                .entry(StackKey {
                    tgid: key.tgid,
                    _pad: 0,
                    stack_id: info.stack_id,
                })
                .or_default();
            t.outstanding_bytes += info.size_bytes as i64;
            t.outstanding_allocs += i64::from(info.count);
            t.total_bytes += info.size_bytes;
            t.total_allocs += u64::from(info.count);
        }
        Ok(acc.into_iter().collect())
    }

    pub fn counters(&self) -> Result<Counters, ReadError> {
        let map = self.ebpf.map(maps::COUNTERS).ok_or(ReadError {
            map: maps::COUNTERS,
            reason: "missing".into(),
        })?;
        let arr: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(read_err(maps::COUNTERS))?;
        let mut out = HashMap::new();
        for c in Counter::ALL {
            let v = arr.get(&(c as u32), 0).map_err(read_err(maps::COUNTERS))?;
            out.insert(c.name(), v.iter().sum());
        }
        Ok(Counters(out))
    }

    /// Drain the syscall ring buffer.
    pub fn drain_syscalls(&mut self, out: &mut Vec<tracer_common::SyscallEvent>) {
        let Some(rb) = self.events.as_mut() else {
            return;
        };
        while let Some(item) = rb.next() {
            if item.len() >= std::mem::size_of::<tracer_common::SyscallEvent>() {
                // SAFETY: the kernel wrote a SyscallEvent (same repr(C)
                // layout); read_unaligned copes with any alignment.
                let ev = unsafe {
                    std::ptr::read_unaligned(item.as_ptr().cast::<tracer_common::SyscallEvent>())
                };
                out.push(ev);
            }
        }
    }

    /// A recorded stack: return addresses and Python frames, innermost
    /// first, and why each walk stopped.
    pub fn stack(&self, stack_id: StackId) -> Option<RawStack> {
        if stack_id == STACK_LOST {
            return None;
        }
        let map = self.ebpf.map(maps::STACKS)?;
        let stacks: BpfHashMap<&MapData, StackId, StackBuf> = BpfHashMap::try_from(map).ok()?;
        let buf = stacks.get(&stack_id, 0).ok()?;
        Some(RawStack::from_buf(&buf))
    }

    /// Forget a process's rows (it exited): its live blocks and its ledger.
    pub fn forget_process(&mut self, tgid: u32) -> Result<(), ReadError> {
        self.forget_processes(&std::iter::once(tgid).collect())
    }

    /// Drop the rows of every process in `tgids`, in one pass over each
    /// table.
    pub fn forget_processes(
        &mut self,
        tgids: &std::collections::HashSet<u32>,
    ) -> Result<(), ReadError> {
        if let Some(map) = self.ebpf.map_mut(maps::STACK_TOTALS) {
            let mut totals: PerCpuHashMap<&mut MapData, StackKey, StackTotals> =
                PerCpuHashMap::try_from(map).map_err(read_err(maps::STACK_TOTALS))?;
            let keys: Vec<StackKey> = totals
                .keys()
                .filter_map(Result::ok)
                .filter(|k| tgids.contains(&k.tgid))
                .collect();
            for k in keys {
                let _ = totals.remove(&k);
            }
        }
        if let Some(map) = self.ebpf.map_mut(maps::LUA_YOUNG) {
            let mut young: BpfHashMap<&mut MapData, StackKey, tracer_common::LuaYoung> =
                BpfHashMap::try_from(map).map_err(read_err(maps::LUA_YOUNG))?;
            let keys: Vec<StackKey> = young
                .keys()
                .filter_map(Result::ok)
                .filter(|k| tgids.contains(&k.tgid))
                .collect();
            for k in keys {
                let _ = young.remove(&k);
            }
        }
        if let Some(map) = self.ebpf.map_mut(maps::LUA_GC) {
            let mut gc: BpfHashMap<&mut MapData, u32, tracer_common::LuaGc> =
                BpfHashMap::try_from(map).map_err(read_err(maps::LUA_GC))?;
            for tgid in tgids {
                let _ = gc.remove(tgid);
            }
        }
        if let Some(map) = self.ebpf.map_mut(maps::GO_BUCKETS) {
            let mut buckets: BpfHashMap<&mut MapData, tracer_common::GoBucketKey, StackTotals> =
                BpfHashMap::try_from(map).map_err(read_err(maps::GO_BUCKETS))?;
            let keys: Vec<_> = buckets
                .keys()
                .filter_map(Result::ok)
                .filter(|k| tgids.contains(&k.tgid))
                .collect();
            for k in keys {
                let _ = buckets.remove(&k);
            }
        }
        if let Some(map) = self.ebpf.map_mut(maps::ALLOCS) {
            let mut allocs: BpfHashMap<
                &mut MapData,
                tracer_common::AllocKey,
                tracer_common::AllocInfo,
            > = BpfHashMap::try_from(map).map_err(read_err(maps::ALLOCS))?;
            let keys: Vec<_> = allocs
                .keys()
                .filter_map(Result::ok)
                .filter(|k| tgids.contains(&k.tgid))
                .collect();
            for k in keys {
                let _ = allocs.remove(&k);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(pairs: &[(Counter, u64)]) -> Counters {
        Counters(pairs.iter().map(|(c, n)| (c.name(), *n)).collect())
    }

    #[test]
    fn broken_pairing_is_called_out() {
        // Debian's 6.12 with the old pairing: nearly every call "nested".
        let c = counters(&[(Counter::Allocs, 7), (Counter::Nested, 55_696)]);
        let p = c.pairing_problem("6.12.118").expect("a problem");
        assert!(p.contains("55696 nested_calls against 7"), "{p}");
        // calloc -> malloc nesting and a few calls in flight at attach.
        let c = counters(&[
            (Counter::Allocs, 50_000),
            (Counter::Nested, 20_000),
            (Counter::MissingEntry, 3),
        ]);
        assert_eq!(c.pairing_problem("6.18"), None);
        // Too few events to judge.
        let c = counters(&[(Counter::MissingReturn, 300)]);
        assert_eq!(c.pairing_problem("6.1"), None);
    }
}
