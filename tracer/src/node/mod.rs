//! `leaktrace node`, the machine-wide daemon: the user-space "tier 0" that
//! watches every process without probes, and the Prometheus exposition.
//!
//! Inputs: pids chosen by the caller (`run::node`), `/proc` and the cgroup
//! filesystem, and the figures the kernel side reports (top growth stacks,
//! losses). Outputs: per-process and per-cgroup memory series with a trend
//! each ([`census`]), the container or unit behind a cgroup path
//! ([`container`]), and the text exposition plus a tiny HTTP server
//! ([`metrics`]).
//!
//! Invariants: everything here is bounded (processes, cgroups, history
//! points, exited processes remembered, series exposed), so a machine that
//! starts and ends thousands of processes does not grow the daemon; and
//! this room imports only `report` (the trend fit) and `sys` (procfs and
//! cgroup mounts).

pub mod census;
pub mod container;
pub mod metrics;
pub mod report;
