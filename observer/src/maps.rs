//! Taking the kernel maps out of the loaded object and reading them.

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray, PerCpuHashMap},
};

use crate::pins::Pins;

/// Hands out the object's maps by name, each once; with adopted pins, the kept families' maps
/// are the pinned ones.
pub struct Maps<'a> {
    ebpf: &'a mut Ebpf,
    pinned: Option<Pinned<'a>>,
}

struct Pinned<'a> {
    pins: &'a Pins,
    /// Maps taken from the pins instead of the object.
    kept: &'a [&'static str],
    /// Maps both the pinned programs and the object's write: taken from both.
    both: &'a [&'static str],
}

impl<'a> Maps<'a> {
    pub const fn new(ebpf: &'a mut Ebpf) -> Self {
        Self { ebpf, pinned: None }
    }

    pub const fn with_pins(
        self,
        pins: &'a Pins,
        kept: &'a [&'static str],
        both: &'a [&'static str],
    ) -> Self {
        Self {
            ebpf: self.ebpf,
            pinned: Some(Pinned { pins, kept, both }),
        }
    }

    pub fn take(&mut self, name: &str) -> anyhow::Result<aya::maps::Map> {
        if let Some(pinned) = &self.pinned
            && pinned.kept.contains(&name)
            && !pinned.both.contains(&name)
        {
            return pinned.pins.map(name);
        }
        self.take_own(name)
    }

    fn take_own(&mut self, name: &str) -> anyhow::Result<aya::maps::Map> {
        self.ebpf
            .take_map(name)
            .ok_or_else(|| anyhow!("the eBPF object has no map {name}"))
    }

    /// A per-CPU counter array, from the object and, when the pinned programs write one of
    /// their own, from the pins too: the counts are the sum of both.
    pub fn per_cpu_arrays(&mut self, name: &str) -> anyhow::Result<Vec<PerCpuArray<MapData, u64>>> {
        let mut arrays = vec![self.per_cpu_array(name)?];
        if let Some(pinned) = &self.pinned
            && pinned.both.contains(&name)
        {
            arrays.push(
                PerCpuArray::try_from(pinned.pins.map(name)?)
                    .with_context(|| format!("map {name}"))?,
            );
        }
        Ok(arrays)
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

/// [`sum_per_cpu`] of several arrays of the same slots, added slot by slot.
pub fn sum_per_cpu_all(maps: &[PerCpuArray<MapData, u64>], slots: u32) -> anyhow::Result<Vec<u64>> {
    let mut total = vec![0; slots as usize];
    for map in maps {
        for (sum, count) in total.iter_mut().zip(sum_per_cpu(map, slots)?) {
            *sum += count;
        }
    }
    Ok(total)
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
