//! The rule and hit maps as data: encoding rules into map entries and back, and editing the
//! maps of a running or pinned attachment in place.
//!
//! The kernel replaces a hash map entry atomically, so a connect() sees either the old or the
//! new entry of a key, never none; editing a live rule set therefore inserts first and removes
//! last, and never clears a map.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd as _,
    path::Path,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, MapError},
};
use bypass_common::{
    HITS_MAP, PROTO_UDP, RULES4_MAP, RULES6_MAP, RuleKey4, RuleKey6, RuleTarget4, RuleTarget6,
};
use serde::{Deserialize, Serialize};

use crate::rule::{Protocol, Rule};

/// The maps of one attachment that `status` and `rules` need, in the order of [`MapIds`].
pub const MAP_NAMES: [&str; 3] = [RULES4_MAP, RULES6_MAP, HITS_MAP];

/// Kernel ids of an attachment's maps, recorded so that other bypass processes can open them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapIds {
    pub rules4: u32,
    pub rules6: u32,
    pub hits: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum RuleMapError {
    #[error("cannot access map {map}")]
    Map { map: &'static str, source: MapError },
    #[error("the attachment has no rule for {0}")]
    NoSuchRule(String),
    #[error("the attachment already has a rule for {existing}; delete it first")]
    Duplicate { existing: Rule },
    #[error(
        "the attachment is full: it holds {max} rules; delete one, or attach again with a \
         larger --max-rules"
    )]
    Full { max: u32 },
}

/// Encodes an IPv4 rule as its map key and value.
pub fn encode4(rule: &Rule, from: Ipv4Addr, to: Ipv4Addr, rule_id: u32) -> (RuleKey4, RuleTarget4) {
    let key = RuleKey4 {
        addr: u32::from_ne_bytes(from.octets()),
        port: rule.from.port().to_be(),
        protocol: rule.protocol.number(),
        _pad: 0,
    };
    let target = RuleTarget4 {
        addr: u32::from_ne_bytes(to.octets()),
        port: rule.to.port().to_be(),
        _pad: 0,
        rule_id,
    };
    (key, target)
}

/// Encodes an IPv6 rule as its map key and value.
pub fn encode6(rule: &Rule, from: Ipv6Addr, to: Ipv6Addr, rule_id: u32) -> (RuleKey6, RuleTarget6) {
    let key = RuleKey6 {
        addr: ipv6_words(from.octets()),
        port: rule.from.port().to_be(),
        protocol: rule.protocol.number(),
        _pad: 0,
    };
    let target = RuleTarget6 {
        addr: ipv6_words(to.octets()),
        port: rule.to.port().to_be(),
        _pad: 0,
        rule_id,
    };
    (key, target)
}

/// Splits a network-order IPv6 address into the four words of the map key.
pub fn ipv6_words(octets: [u8; 16]) -> [u32; 4] {
    let word =
        |i: usize| u32::from_ne_bytes([octets[i], octets[i + 1], octets[i + 2], octets[i + 3]]);
    [word(0), word(4), word(8), word(12)]
}

/// Joins the four words of a map key back into an IPv6 address.
pub fn ipv6_from_words(words: [u32; 4]) -> Ipv6Addr {
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    Ipv6Addr::from(octets)
}

fn protocol_of(number: u8) -> Protocol {
    if number == PROTO_UDP {
        Protocol::Udp
    } else {
        Protocol::Tcp
    }
}

/// Decodes an IPv4 map entry back into its rule and rule id.
pub fn decode4(key: &RuleKey4, target: &RuleTarget4) -> (Rule, u32) {
    let ip = |addr: u32| IpAddr::V4(Ipv4Addr::from(addr.to_ne_bytes()));
    let rule = Rule {
        protocol: protocol_of(key.protocol),
        from: SocketAddr::new(ip(key.addr), u16::from_be(key.port)),
        to: SocketAddr::new(ip(target.addr), u16::from_be(target.port)),
    };
    (rule, target.rule_id)
}

/// Decodes an IPv6 map entry back into its rule and rule id.
pub fn decode6(key: &RuleKey6, target: &RuleTarget6) -> (Rule, u32) {
    let ip = |addr| IpAddr::V6(ipv6_from_words(addr));
    let rule = Rule {
        protocol: protocol_of(key.protocol),
        from: SocketAddr::new(ip(key.addr), u16::from_be(key.port)),
        to: SocketAddr::new(ip(target.addr), u16::from_be(target.port)),
    };
    (rule, target.rule_id)
}

/// Returns the [`MapData`] inside the kinds of map that bypass uses.
fn map_data(map: &Map) -> Option<&MapData> {
    match map {
        Map::HashMap(data) | Map::Array(data) => Some(data),
        _ => None,
    }
}

fn loaded_map<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a MapData, RuleMapError> {
    ebpf.map(name).and_then(map_data).ok_or(RuleMapError::Map {
        map: name,
        source: MapError::InvalidName { name: name.into() },
    })
}

/// Returns the kernel ids of the rule and hit maps of a loaded object.
pub fn map_ids(ebpf: &Ebpf) -> Result<MapIds, RuleMapError> {
    let id = |name| {
        let info = loaded_map(ebpf, name)?
            .info()
            .map_err(|source| RuleMapError::Map { map: name, source })?;
        Ok::<_, RuleMapError>(info.id())
    };
    Ok(MapIds {
        rules4: id(RULES4_MAP)?,
        rules6: id(RULES6_MAP)?,
        hits: id(HITS_MAP)?,
    })
}

/// Pins the rule and hit maps of a loaded object into `dir`, one file per map name.
pub fn pin_maps(ebpf: &Ebpf, dir: &Path) -> Result<(), aya::pin::PinError> {
    for name in MAP_NAMES {
        if let Some(map) = ebpf.map(name) {
            map.pin(dir.join(name))?;
        }
    }
    Ok(())
}

/// The rule and hit maps of an attachment, opened by id or from pins.
pub struct RuleMaps {
    v4: HashMap<MapData, RuleKey4, RuleTarget4>,
    v6: HashMap<MapData, RuleKey6, RuleTarget6>,
    hits: Array<MapData, u64>,
}

impl RuleMaps {
    /// Opens the maps of a loaded object through new file descriptors of their own.
    pub fn from_ebpf(ebpf: &Ebpf) -> Result<Self, RuleMapError> {
        Self::open(|name| {
            let fd = loaded_map(ebpf, name)?
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|err| RuleMapError::Map {
                    map: name,
                    source: MapError::from(aya::sys::SyscallError {
                        call: "dup",
                        io_error: err,
                    }),
                })?;
            MapData::from_fd(fd).map_err(|source| RuleMapError::Map { map: name, source })
        })
    }

    /// Opens the maps of a running loader by the ids it recorded.
    pub fn from_ids(ids: MapIds) -> Result<Self, RuleMapError> {
        Self::open(|name| {
            let id = match name {
                RULES4_MAP => ids.rules4,
                RULES6_MAP => ids.rules6,
                _ => ids.hits,
            };
            MapData::from_id(id).map_err(|source| RuleMapError::Map { map: name, source })
        })
    }

    /// Opens the maps pinned in `dir`.
    pub fn from_pins(dir: &Path) -> Result<Self, RuleMapError> {
        Self::open(|name| {
            MapData::from_pin(dir.join(name))
                .map_err(|source| RuleMapError::Map { map: name, source })
        })
    }

    fn open(
        mut open: impl FnMut(&'static str) -> Result<MapData, RuleMapError>,
    ) -> Result<Self, RuleMapError> {
        let typed = |name: &'static str, data| {
            Map::from_map_data(data).map_err(|source| RuleMapError::Map { map: name, source })
        };
        let convert = |name: &'static str| move |source| RuleMapError::Map { map: name, source };
        Ok(Self {
            v4: HashMap::try_from(typed(RULES4_MAP, open(RULES4_MAP)?)?)
                .map_err(convert(RULES4_MAP))?,
            v6: HashMap::try_from(typed(RULES6_MAP, open(RULES6_MAP)?)?)
                .map_err(convert(RULES6_MAP))?,
            hits: Array::try_from(typed(HITS_MAP, open(HITS_MAP)?)?).map_err(convert(HITS_MAP))?,
        })
    }

    /// Returns every rule with its id, in id order.
    pub fn rules(&self) -> Result<Vec<(Rule, u32)>, RuleMapError> {
        let mut rules = Vec::new();
        for entry in self.v4.iter() {
            let (key, target) = entry.map_err(|source| RuleMapError::Map {
                map: RULES4_MAP,
                source,
            })?;
            rules.push(decode4(&key, &target));
        }
        for entry in self.v6.iter() {
            let (key, target) = entry.map_err(|source| RuleMapError::Map {
                map: RULES6_MAP,
                source,
            })?;
            rules.push(decode6(&key, &target));
        }
        rules.sort_by_key(|&(_, id)| id);
        Ok(rules)
    }

    /// Returns the hits of rule `rule_id`.
    pub fn hits(&self, rule_id: u32) -> Result<u64, RuleMapError> {
        self.hits
            .get(&rule_id, 0)
            .map_err(|source| RuleMapError::Map {
                map: HITS_MAP,
                source,
            })
    }

    /// Returns the rule id kept for the temporary rule of the check after attaching: the last
    /// slot, which the loader creates beyond `--max-rules`, so user rules never share it.
    pub fn check_rule_id(&self) -> u32 {
        self.hits.len() - 1
    }

    /// Adds `rule` under the lowest free rule id, with its counter reset; returns the id.
    pub fn add(&mut self, rule: &Rule) -> Result<u32, RuleMapError> {
        let rules = self.rules()?;
        if let Some((existing, _)) = rules.iter().find(|(known, _)| same_source(known, rule)) {
            return Err(RuleMapError::Duplicate {
                existing: *existing,
            });
        }
        let rule_id = free_id(rules.iter().map(|&(_, id)| id), self.check_rule_id())?;
        self.reset_hits(rule_id)?;
        self.insert(rule, rule_id)?;
        Ok(rule_id)
    }

    /// Inserts or replaces the entry of `rule` with id `rule_id`, in one atomic update.
    pub fn insert(&mut self, rule: &Rule, rule_id: u32) -> Result<(), RuleMapError> {
        match (rule.from.ip(), rule.to.ip()) {
            (IpAddr::V4(from), IpAddr::V4(to)) => {
                let (key, target) = encode4(rule, from, to, rule_id);
                self.v4
                    .insert(key, target, 0)
                    .map_err(|source| RuleMapError::Map {
                        map: RULES4_MAP,
                        source,
                    })
            }
            (IpAddr::V6(from), IpAddr::V6(to)) => {
                let (key, target) = encode6(rule, from, to, rule_id);
                self.v6
                    .insert(key, target, 0)
                    .map_err(|source| RuleMapError::Map {
                        map: RULES6_MAP,
                        source,
                    })
            }
            _ => unreachable!("Rule::new rejects rules that change the address family"),
        }
    }

    /// Removes the rule with `rule`'s protocol and source; returns the removed rule.
    pub fn remove(&mut self, rule: &Rule) -> Result<Rule, RuleMapError> {
        let rules = self.rules()?;
        let (existing, _) = rules
            .iter()
            .find(|(known, _)| same_source(known, rule))
            .ok_or_else(|| RuleMapError::NoSuchRule(format!("{}/{}", rule.protocol, rule.from)))?;
        let result = match rule.from.ip() {
            IpAddr::V4(from) => self
                .v4
                .remove(&encode4(rule, from, Ipv4Addr::UNSPECIFIED, 0).0),
            IpAddr::V6(from) => self
                .v6
                .remove(&encode6(rule, from, Ipv6Addr::UNSPECIFIED, 0).0),
        };
        result.map_err(|source| RuleMapError::Map {
            map: if rule.from.is_ipv4() {
                RULES4_MAP
            } else {
                RULES6_MAP
            },
            source,
        })?;
        Ok(*existing)
    }

    fn reset_hits(&mut self, rule_id: u32) -> Result<(), RuleMapError> {
        self.hits
            .set(rule_id, 0, 0)
            .map_err(|source| RuleMapError::Map {
                map: HITS_MAP,
                source,
            })
    }
}

/// Returns whether two rules match the same connections (same protocol and source).
pub fn same_source(a: &Rule, b: &Rule) -> bool {
    a.protocol == b.protocol && a.from == b.from
}

/// Returns the lowest id below `capacity` that `used` does not contain.
fn free_id(used: impl Iterator<Item = u32>, capacity: u32) -> Result<u32, RuleMapError> {
    let mut used: Vec<u32> = used.collect();
    used.sort_unstable();
    let mut candidate = 0;
    for id in used {
        if id == candidate {
            candidate += 1;
        } else if id > candidate {
            break;
        }
    }
    if candidate < capacity {
        Ok(candidate)
    } else {
        Err(RuleMapError::Full { max: capacity })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(text: &str) -> Rule {
        text.parse().expect("valid rule")
    }

    #[test]
    fn entries_decode_to_the_same_rule() {
        let v4 = rule("udp/10.0.0.53:53=127.0.0.1:5353");
        let (key, target) = encode4(
            &v4,
            "10.0.0.53".parse().unwrap(),
            "127.0.0.1".parse().unwrap(),
            7,
        );
        assert_eq!(decode4(&key, &target), (v4, 7));
        let v6 = rule("[fd00::22]:80=[fd00::1]:3000");
        let (key, target) = encode6(
            &v6,
            "fd00::22".parse().unwrap(),
            "fd00::1".parse().unwrap(),
            3,
        );
        assert_eq!(decode6(&key, &target), (v6, 3));
    }

    #[test]
    fn free_id_fills_gaps_first() {
        assert_eq!(free_id([].into_iter(), 4).unwrap(), 0);
        assert_eq!(free_id([0, 1, 3].into_iter(), 4).unwrap(), 2);
        assert_eq!(free_id([2, 0, 1].into_iter(), 4).unwrap(), 3);
        assert!(matches!(
            free_id([0, 1].into_iter(), 2),
            Err(RuleMapError::Full { max: 2 })
        ));
    }

    #[test]
    fn ipv6_words_keep_network_order() {
        let octets = "fd00::22".parse::<Ipv6Addr>().unwrap().octets();
        let words = ipv6_words(octets);
        assert_eq!(words[0].to_ne_bytes(), [0xfd, 0, 0, 0]);
        assert_eq!(
            ipv6_from_words(words),
            "fd00::22".parse::<Ipv6Addr>().unwrap()
        );
    }
}
