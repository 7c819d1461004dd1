//! Taking the kernel maps out of the loaded object and reading them.

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray, PerCpuHashMap},
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

    pub fn per_cpu_hash<K: aya::Pod>(
        &mut self,
        name: &str,
    ) -> anyhow::Result<PerCpuHashMap<MapData, K, u64>> {
        PerCpuHashMap::try_from(self.take(name)?).with_context(|| format!("map {name}"))
    }
}

/// Every slot of a per-CPU counter array, summed over CPUs. A slot that cannot be read fails
/// the read: its collector's part of the scrape then fails visibly
/// (`observer_scrape_collector_success 0`), instead of a counter that reads 0.
pub fn sum_per_cpu(map: &PerCpuArray<MapData, u64>, slots: u32) -> anyhow::Result<Vec<u64>> {
    (0..slots)
        .map(|index| {
            map.get(&index, 0)
                .map(|values| values.iter().sum())
                .with_context(|| format!("reading slot {index} of a per-CPU array"))
        })
        .collect()
}

/// The highest of the CPUs' values in slot `index`.
pub fn max_per_cpu(map: &PerCpuArray<MapData, u64>, index: u32) -> anyhow::Result<u64> {
    map.get(&index, 0)
        .map(|values| values.iter().copied().max().unwrap_or(0))
        .with_context(|| format!("reading slot {index} of a per-CPU array"))
}

/// Every entry of a per-CPU hash map, its values summed over CPUs.
pub fn sum_per_cpu_hash<K: aya::Pod>(
    map: &PerCpuHashMap<MapData, K, u64>,
) -> anyhow::Result<Vec<(K, u64)>> {
    map.iter()
        .map(|entry| {
            entry
                .map(|(key, values)| (key, values.iter().sum()))
                .context("reading a per-CPU hash map")
        })
        .collect()
}
