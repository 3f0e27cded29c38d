//! The per-worker port allocator (ADR-004, FR-2.2.3c, FR-2.2.4).
//!
//! Every worker has a port range (2000–9999 by default). An instance gets one port per entry of
//! its definition's port template, taken as the **lowest free** ports of the range, when it is
//! placed; they are held until the instance is terminated and then released for reuse. Ports are
//! per worker, never global: two workers hand out the same numbers.
//!
//! Allocation is all-or-nothing (exhaustion changes nothing) and idempotent per instance: asking
//! again for the same instance and the same port names returns the ports it already holds.
//! Used ports are a bitmap, so finding the lowest free port is a scan of 64-bit words.

use std::collections::{BTreeMap, HashMap};

use crate::error::{CoreError, CoreResult};
use crate::model::PortRange;

/// Ports of one worker: who holds which.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortAllocator {
    range: PortRange,
    /// Bit `i` set = port `range.start + i` is taken.
    used: Vec<u64>,
    free: usize,
    /// Instance id → (port name → port).
    holders: HashMap<String, BTreeMap<String, u16>>,
    /// Words before this index are full: where the search for a free port starts.
    first_maybe_free: usize,
}

impl PortAllocator {
    /// An allocator with every port of `range` free.
    ///
    /// The range must be non-empty and must not include port 0.
    pub fn new(range: PortRange) -> CoreResult<Self> {
        if range.start == 0 {
            return Err(CoreError::InvalidPortRange {
                start: 0,
                end: u32::from(range.end),
                why: "port 0 cannot be allocated".into(),
            });
        }
        if range.end < range.start {
            return Err(CoreError::InvalidPortRange {
                start: u32::from(range.start),
                end: u32::from(range.end),
                why: "the range ends before it starts".into(),
            });
        }
        let len = range.len();
        Ok(PortAllocator {
            range,
            used: vec![0; len.div_ceil(64)],
            free: len,
            holders: HashMap::new(),
            first_maybe_free: 0,
        })
    }

    /// The range.
    pub fn range(&self) -> PortRange {
        self.range
    }

    /// Ports still free.
    pub fn free_count(&self) -> usize {
        self.free
    }

    /// Ports taken.
    pub fn used_count(&self) -> usize {
        self.range.len() - self.free
    }

    /// `true` when `port` is inside the range and nobody holds it.
    pub fn is_free(&self, port: u16) -> bool {
        self.index(port).is_some_and(|i| !self.bit(i))
    }

    /// The instance holding `port`, if any.
    pub fn holder_of(&self, port: u16) -> Option<&str> {
        self.holders
            .iter()
            .find(|(_, ports)| ports.values().any(|p| *p == port))
            .map(|(id, _)| id.as_str())
    }

    /// The ports `instance_id` holds.
    pub fn ports_of(&self, instance_id: &str) -> Option<&BTreeMap<String, u16>> {
        self.holders.get(instance_id)
    }

    /// Every allocation: instance id → ports.
    pub fn allocations(&self) -> impl Iterator<Item = (&str, &BTreeMap<String, u16>)> {
        self.holders.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Gives `instance_id` one port per name: the lowest free ports, in the order of `names`.
    ///
    /// If the instance already holds exactly these names, returns what it holds. If it holds
    /// other names, the request is refused (release first). Nothing changes on error.
    pub fn allocate(
        &mut self,
        instance_id: &str,
        names: &[impl AsRef<str>],
    ) -> CoreResult<BTreeMap<String, u16>> {
        if let Some(held) = self.holders.get(instance_id) {
            let same =
                held.len() == names.len() && names.iter().all(|n| held.contains_key(n.as_ref()));
            return if same {
                Ok(held.clone())
            } else {
                Err(CoreError::invalid(
                    "ports",
                    format!("instance {instance_id} already holds other ports; release them first"),
                ))
            };
        }
        let mut seen = std::collections::BTreeSet::new();
        for n in names {
            if n.as_ref().is_empty() || !seen.insert(n.as_ref()) {
                return Err(CoreError::invalid(
                    "port_template",
                    format!(
                        "port names must be unique and non-empty, got {:?}",
                        n.as_ref()
                    ),
                ));
            }
        }
        if names.len() > self.free {
            return Err(self.exhausted(names.len()));
        }
        let mut ports = BTreeMap::new();
        for n in names {
            let Some(i) = self.lowest_free() else {
                // Unreachable while `free` is right; undo to keep the all-or-nothing promise.
                for p in ports.values() {
                    if let Some(i) = self.index(*p) {
                        self.clear(i);
                    }
                }
                return Err(self.exhausted(names.len()));
            };
            self.set(i);
            ports.insert(n.as_ref().to_string(), self.port_at(i));
        }
        self.holders.insert(instance_id.to_string(), ports.clone());
        Ok(ports)
    }

    /// Records ports an instance already holds (when rebuilding from the store).
    ///
    /// Refused without change if a port is outside the range or held by another instance.
    pub fn restore(&mut self, instance_id: &str, ports: &BTreeMap<String, u16>) -> CoreResult<()> {
        if self.holders.contains_key(instance_id) {
            return Err(CoreError::invalid(
                "ports",
                format!("instance {instance_id} already holds ports"),
            ));
        }
        let mut indices = Vec::with_capacity(ports.len());
        for (name, port) in ports {
            let Some(i) = self.index(*port) else {
                return Err(CoreError::invalid(
                    format!("allocated_ports.{name}"),
                    format!(
                        "port {port} is outside the worker's range {}-{}",
                        self.range.start, self.range.end
                    ),
                ));
            };
            if self.bit(i) || indices.contains(&i) {
                return Err(CoreError::invalid(
                    format!("allocated_ports.{name}"),
                    format!("port {port} is already held"),
                ));
            }
            indices.push(i);
        }
        for i in indices {
            self.set(i);
        }
        self.holders.insert(instance_id.to_string(), ports.clone());
        Ok(())
    }

    /// Frees every port of `instance_id`, returning them.
    pub fn release(&mut self, instance_id: &str) -> Option<BTreeMap<String, u16>> {
        let ports = self.holders.remove(instance_id)?;
        for p in ports.values() {
            if let Some(i) = self.index(*p) {
                self.clear(i);
            }
        }
        Some(ports)
    }

    fn exhausted(&self, requested: usize) -> CoreError {
        CoreError::PortsExhausted {
            range_start: self.range.start,
            range_end: self.range.end,
            requested,
            free: self.free,
        }
    }

    fn index(&self, port: u16) -> Option<usize> {
        (self.range.start..=self.range.end)
            .contains(&port)
            .then(|| usize::from(port - self.range.start))
    }

    fn port_at(&self, i: usize) -> u16 {
        // `i` < range.len() ≤ 65535 − start + 1, so this stays inside u16.
        self.range.start + i as u16
    }

    fn bit(&self, i: usize) -> bool {
        self.used[i / 64] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, i: usize) {
        self.used[i / 64] |= 1 << (i % 64);
        self.free -= 1;
    }

    fn clear(&mut self, i: usize) {
        self.used[i / 64] &= !(1 << (i % 64));
        self.free += 1;
        self.first_maybe_free = self.first_maybe_free.min(i / 64);
    }

    fn lowest_free(&mut self) -> Option<usize> {
        let len = self.range.len();
        while self.first_maybe_free < self.used.len() {
            let w = self.first_maybe_free;
            let bit = self.used[w].trailing_ones() as usize;
            if bit < 64 {
                let i = w * 64 + bit;
                return (i < len).then_some(i);
            }
            self.first_maybe_free += 1;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: u16, end: u16) -> PortRange {
        PortRange { start, end }
    }

    #[test]
    fn lowest_free_ports_in_template_order() {
        let mut a = PortAllocator::new(PortRange::default()).expect("valid");
        let p = a.allocate("i1", &["serial_1", "vnc_1"]).expect("free");
        assert_eq!(p["serial_1"], 2000);
        assert_eq!(p["vnc_1"], 2001);
        let q = a.allocate("i2", &["serial_1"]).expect("free");
        assert_eq!(q["serial_1"], 2002);
        assert_eq!(a.used_count(), 3);
        assert_eq!(a.free_count(), 8000 - 3);
        assert_eq!(a.holder_of(2001), Some("i1"));
    }

    #[test]
    fn released_ports_are_reused_lowest_first() {
        let mut a = PortAllocator::new(range(2000, 2009)).expect("valid");
        a.allocate("i1", &["a", "b"]).expect("free");
        a.allocate("i2", &["a"]).expect("free");
        assert_eq!(a.release("i1").map(|p| p.len()), Some(2));
        assert!(a.is_free(2000) && a.is_free(2001) && !a.is_free(2002));
        let p = a.allocate("i3", &["x", "y", "z"]).expect("free");
        assert_eq!(p.values().copied().collect::<Vec<_>>(), [2000, 2001, 2003]);
        assert_eq!(a.release("nobody"), None);
    }

    #[test]
    fn exhaustion_is_an_error_and_changes_nothing() {
        let mut a = PortAllocator::new(range(2000, 2002)).expect("valid");
        a.allocate("i1", &["a", "b"]).expect("free");
        let err = a.allocate("i2", &["a", "b"]).expect_err("only one left");
        assert_eq!(
            err,
            CoreError::PortsExhausted {
                range_start: 2000,
                range_end: 2002,
                requested: 2,
                free: 1
            }
        );
        assert_eq!(a.free_count(), 1);
        assert!(a.ports_of("i2").is_none());
    }

    #[test]
    fn allocation_is_idempotent_per_instance() {
        let mut a = PortAllocator::new(range(2000, 2100)).expect("valid");
        let first = a.allocate("i1", &["serial_1", "vnc_1"]).expect("free");
        let again = a
            .allocate("i1", &["vnc_1", "serial_1"])
            .expect("same names");
        assert_eq!(first, again);
        assert_eq!(a.used_count(), 2);
        assert!(a.allocate("i1", &["other"]).is_err());
    }

    #[test]
    fn duplicate_or_empty_names_are_refused() {
        let mut a = PortAllocator::new(range(2000, 2100)).expect("valid");
        assert!(a.allocate("i1", &["a", "a"]).is_err());
        assert!(a.allocate("i1", &[""]).is_err());
        assert_eq!(a.used_count(), 0);
    }

    #[test]
    fn invalid_ranges_are_refused() {
        assert!(PortAllocator::new(range(0, 10)).is_err());
        assert!(PortAllocator::new(range(3000, 2000)).is_err());
        let one = PortAllocator::new(range(65535, 65535)).expect("one port");
        assert_eq!(one.free_count(), 1);
    }

    #[test]
    fn restore_rebuilds_and_rejects_conflicts() {
        let mut a = PortAllocator::new(range(2000, 2010)).expect("valid");
        let held = BTreeMap::from([("serial_1".to_string(), 2005u16)]);
        a.restore("i1", &held).expect("free");
        assert!(!a.is_free(2005));
        assert!(a.restore("i2", &held).is_err(), "2005 is taken");
        let outside = BTreeMap::from([("x".to_string(), 3000u16)]);
        assert!(a.restore("i3", &outside).is_err());
        assert_eq!(a.used_count(), 1);
        // The next allocation skips the restored port.
        let p = a
            .allocate("i4", &["a", "b", "c", "d", "e", "f"])
            .expect("free");
        assert!(!p.values().any(|v| *v == 2005));
    }

    #[test]
    fn full_range_then_lowest_free_after_release_in_a_later_word() {
        let mut a = PortAllocator::new(range(2000, 2199)).expect("valid");
        let names: Vec<String> = (0..200).map(|i| format!("p{i}")).collect();
        a.allocate("all", &names).expect("exactly fits");
        assert_eq!(a.free_count(), 0);
        a.release("all");
        let p = a.allocate("one", &["x"]).expect("free again");
        assert_eq!(p["x"], 2000);
    }
}
