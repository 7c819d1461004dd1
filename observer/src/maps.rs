//! Taking the kernel maps out of the loaded object and reading them.

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
};

/// Hands out the object's maps by name, each once.
pub struct Maps<'a> {
    ebpf: &'a mut Ebpf,
}

impl<'a> Maps<'a> {
    pub const fn new(ebpf: &'a mut Ebpf) -> Self {
        Self { ebpf }
    }

    pub fn take(&mut self, name: &str) -> anyhow::Result<aya::maps::Map> {
        self.ebpf
            .take_map(name)
            .ok_or_else(|| anyhow!("the eBPF object has no map {name}"))
    }

    pub fn per_cpu_array(&mut self, name: &str) -> anyhow::Result<PerCpuArray<MapData, u64>> {
        PerCpuArray::try_from(self.take(name)?).with_context(|| format!("map {name}"))
    }
}

/// Every slot of a per-CPU counter array, summed over CPUs. A slot that cannot be read counts 0
/// (and is logged): a scrape should not fail for one counter.
pub fn sum_per_cpu(map: &PerCpuArray<MapData, u64>, slots: u32) -> Vec<u64> {
    (0..slots)
        .map(|index| match map.get(&index, 0) {
            Ok(values) => values.iter().sum(),
            Err(err) => {
                log::debug!("reading slot {index}: {err}");
                0
            }
        })
        .collect()
}

/// The highest of the CPUs' values in slot `index` (0 when it cannot be read, logged).
pub fn max_per_cpu(map: &PerCpuArray<MapData, u64>, index: u32) -> u64 {
    match map.get(&index, 0) {
        Ok(values) => values.iter().copied().max().unwrap_or(0),
        Err(err) => {
            log::debug!("reading slot {index}: {err}");
            0
        }
    }
}
