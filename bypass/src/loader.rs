//! Loading the embedded eBPF object, filling the rule maps, and attaching the programs.
//!
//! Nothing is pinned: every program, link and map belongs to the [`Redirector`], and the
//! kernel detaches and frees them when it is dropped or when this process dies, even by
//! `SIGKILL`.

use std::{fs::File, net::IpAddr, path::Path};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, HashMap, MapData},
    programs::{
        CgroupAttachMode, Program, ProgramError, cgroup_sock::CgroupSockLinkId,
        cgroup_sock_addr::CgroupSockAddrLinkId, links::FdLink,
    },
};
use bypass_common::{
    HITS_MAP, LOG_RATE_GLOBAL, RULES4_MAP, RULES6_MAP, RuleKey4, RuleKey6, RuleTarget4, RuleTarget6,
};

use crate::{
    rule::{Rule, RuleSet},
    rulemap,
};

/// The eBPF object built from `bypass-ebpf` by `build.rs`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bypass.bpf.o"));

/// Verifier log lines shown in an error; the whole log goes to the debug log.
const VERIFIER_LINES_SHOWN: usize = 6;

/// One program of the object.
pub(crate) struct ProgramSpec {
    /// Program name, which is also its attach point.
    pub name: &'static str,
    /// Whether bypass fails without it. Any other program that the kernel rejects is skipped
    /// with a warning.
    pub required: bool,
    /// The loss when the kernel lacks it, completing "so ...".
    pub lost: &'static str,
    /// Whether only UDP rules use it: a TCP socket never reaches it.
    pub udp_only: bool,
    /// Rank of the verifier's work on it, 0 for the most: see [`load_programs`].
    pub load_rank: u8,
}

const fn spec(
    name: &'static str,
    required: bool,
    udp_only: bool,
    load_rank: u8,
    lost: &'static str,
) -> ProgramSpec {
    ProgramSpec {
        name,
        required,
        lost,
        udp_only,
        load_rank,
    }
}

/// The programs in the object, in attach order.
#[rustfmt::skip]
pub(crate) const PROGRAMS: &[ProgramSpec] = &[
    // First, so that it is attached before any socket is redirected.
    spec("sock_release", false, false, 2, "the reverse map keeps closed sockets until bypass \
         exits, and getpeername() and recvmsg() show the new address once it is full"),
    spec("connect4", true, false, 1, "IPv4 connect() is not redirected"),
    spec("connect6", false, false, 0, "IPv6 and IPv4-mapped connect() is not redirected"),
    spec("sendmsg4", false, true, 1, "unconnected IPv4 and IPv4-mapped UDP sends are not \
         redirected"),
    spec("sendmsg6", false, true, 0, "unconnected IPv6 UDP sends are not redirected"),
    spec("recvmsg4", false, true, 2, "IPv4 UDP replies show the new source address, not the \
         original"),
    spec("recvmsg6", false, true, 2, "IPv6 UDP replies show the new source address, not the \
         original"),
    spec("getpeername4", false, false, 2, "getpeername() on IPv4 sockets shows the new address"),
    spec("getpeername6", false, false, 2, "getpeername() on IPv6 sockets shows the new address"),
];

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "permission denied: loading eBPF programs needs CAP_BPF and CAP_NET_ADMIN (or \
         CAP_SYS_ADMIN); run as root, e.g. with sudo"
    )]
    NotPermitted,
    #[error(
        "too many rules: {count} given, but the maps hold {max}; raise the limit with --max-rules"
    )]
    TooManyRules { count: usize, max: u32 },
    #[error("cannot load the eBPF object")]
    Object(#[source] EbpfError),
    #[error("the eBPF object has no program `{0}`; the build is broken")]
    MissingProgram(&'static str),
    #[error("the kernel rejected program {name}: {summary}")]
    Verifier { name: &'static str, summary: String },
    #[error("cannot load program {name}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("cannot attach program {name} to {cgroup}")]
    Attach {
        name: &'static str,
        cgroup: String,
        source: ProgramError,
    },
    #[error(
        "{0} was attached without a BPF link, which cannot be pinned; pinning needs Linux 5.7 or later"
    )]
    NotALink(&'static str),
    #[error("cannot open cgroup {cgroup}")]
    OpenCgroup {
        cgroup: String,
        source: std::io::Error,
    },
    #[error("cannot access map {map}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("cannot insert rule `{rule}`")]
    Insert {
        rule: Rule,
        source: aya::maps::MapError,
    },
}

/// Load-time settings.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Capacity of the rule maps and hit counters.
    pub max_rules: u32,
    /// Hit log lines per second and CPU; 0 turns the hit log off.
    pub log_rate: u32,
    /// Whether to load the programs that only UDP rules use. Without UDP rules
    /// they would never hit, yet run on every UDP datagram the job sends or receives.
    pub udp: bool,
}

/// The loaded programs and their maps. Dropping it detaches everything.
pub struct Redirector {
    ebpf: Ebpf,
    loaded: Vec<&'static str>,
    rule_count: u32,
    /// Rule id of the temporary rule of the check after attaching: `--max-rules`.
    check_rule_id: u32,
    links: Vec<(&'static str, LinkId)>,
}

/// The link of an attached program, by program type.
enum LinkId {
    SockAddr(CgroupSockAddrLinkId),
    Sock(CgroupSockLinkId),
}

/// Checks the effective capabilities before touching the kernel, so a missing one gives a
/// clear message instead of an `EPERM` from some map creation.
pub fn check_privileges() -> Result<(), LoadError> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_BPF: u32 = 39;

    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| effective & (1 << cap) != 0;
    let bpf = has(CAP_BPF) || has(CAP_SYS_ADMIN);
    let net_admin = has(CAP_NET_ADMIN) || has(CAP_SYS_ADMIN);
    if bpf && net_admin {
        Ok(())
    } else {
        Err(LoadError::NotPermitted)
    }
}

impl Redirector {
    /// Loads the object and every program the kernel accepts, then inserts `rules`.
    pub fn load(rules: &RuleSet, options: LoadOptions) -> Result<Self, LoadError> {
        if rules.len() > options.max_rules as usize {
            return Err(LoadError::TooManyRules {
                count: rules.len(),
                max: options.max_rules,
            });
        }
        // Level 0 makes every aya-log statement dead code that the verifier never walks.
        let log_level: u8 = if options.log_rate == 0 { 0 } else { 0xff };
        // One slot more than --max-rules, for the temporary rule of the check after attaching.
        let capacity = options.max_rules.saturating_add(1);
        // The programs need no relocation against kernel types: skip parsing the kernel's BTF.
        let started = std::time::Instant::now();
        let mut ebpf = crate::kernel_btf::without_kernel_btf(|| {
            EbpfLoader::new()
                .map_max_entries(RULES4_MAP, capacity)
                .map_max_entries(RULES6_MAP, capacity)
                .map_max_entries(HITS_MAP, capacity)
                .override_global(LOG_RATE_GLOBAL, &options.log_rate, true)
                .override_global(aya_log::LEVEL, &log_level, false)
                .load(EBPF_OBJECT)
        })
        .map_err(object_error)?;
        log::debug!("created the maps in {:.1?}", started.elapsed());

        let wanted = |program: &ProgramSpec| options.udp || !program.udp_only;
        if !options.udp {
            log::info!(
                "no udp rule: the sendmsg and recvmsg programs are not loaded, so UDP traffic \
                 runs no bypass program"
            );
        }
        let mut loaded = Vec::new();
        let outcomes = load_programs(&mut ebpf, &wanted)?;
        for (program, outcome) in PROGRAMS.iter().zip(outcomes) {
            let Some(outcome) = outcome else {
                continue;
            };
            let (name, lost) = (program.name, program.lost);
            match outcome {
                Ok(()) => loaded.push(name),
                Err(err) if !program.required => {
                    log::warn!("{name} is not available on this kernel ({err}); {lost}");
                }
                Err(err) => return Err(program_error(name, err)),
            }
        }

        let mut redirector = Self {
            ebpf,
            loaded,
            rule_count: 0,
            check_rule_id: options.max_rules,
            links: Vec::new(),
        };
        for (rule, _) in rules.iter() {
            redirector.insert(rule)?;
        }
        Ok(redirector)
    }

    fn insert(&mut self, rule: &Rule) -> Result<(), LoadError> {
        let rule_id = self.rule_count;
        let insert_error = |source| LoadError::Insert {
            rule: *rule,
            source,
        };
        match (rule.from.ip(), rule.to.ip()) {
            (IpAddr::V4(from), IpAddr::V4(to)) => {
                let mut map: HashMap<_, RuleKey4, RuleTarget4> = self.map_mut(RULES4_MAP)?;
                let (key, target) = rulemap::encode4(rule, from, to, rule_id);
                map.insert(key, target, 0).map_err(insert_error)?;
            }
            (IpAddr::V6(from), IpAddr::V6(to)) => {
                let mut map: HashMap<_, RuleKey6, RuleTarget6> = self.map_mut(RULES6_MAP)?;
                let (key, target) = rulemap::encode6(rule, from, to, rule_id);
                map.insert(key, target, 0).map_err(insert_error)?;
            }
            _ => unreachable!("Rule::new rejects rules that change the address family"),
        }
        self.rule_count += 1;
        Ok(())
    }

    fn map_mut<'a, T>(&'a mut self, name: &'static str) -> Result<T, LoadError>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self.ebpf.map_mut(name).ok_or(LoadError::Map {
            map: name,
            source: aya::maps::MapError::InvalidName { name: name.into() },
        })?;
        T::try_from(map).map_err(|source| LoadError::Map { map: name, source })
    }

    /// Attaches every loaded program to the cgroup at `cgroup`.
    ///
    /// On Linux 5.7 and later aya attaches through a BPF link, which the kernel always adds in
    /// `BPF_F_ALLOW_MULTI` mode (it rejects link flags), so programs of other tools on the same
    /// cgroup (systemd's, a container runtime's) keep running beside ours. `Single` here only
    /// selects "no flags"; on older kernels it would be an exclusive attachment.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), LoadError> {
        let shown = cgroup.display().to_string();
        let file = File::open(cgroup).map_err(|source| LoadError::OpenCgroup {
            cgroup: shown.clone(),
            source,
        })?;
        for &name in &self.loaded.clone() {
            let attach_error = |source| LoadError::Attach {
                name,
                cgroup: shown.clone(),
                source,
            };
            let link_id = match self.program(name)? {
                Program::CgroupSockAddr(program) => program
                    .attach(&file, CgroupAttachMode::Single)
                    .map(LinkId::SockAddr),
                Program::CgroupSock(program) => program
                    .attach(&file, CgroupAttachMode::Single)
                    .map(LinkId::Sock),
                _ => return Err(LoadError::MissingProgram(name)),
            }
            .map_err(attach_error)?;
            self.links.push((name, link_id));
            log::info!("attached {name} to {shown}");
        }
        Ok(())
    }

    fn program(&mut self, name: &'static str) -> Result<&mut Program, LoadError> {
        self.ebpf
            .program_mut(name)
            .ok_or(LoadError::MissingProgram(name))
    }

    /// Returns the hit count of each rule, in rule id order.
    pub fn hits(&self) -> Result<Vec<u64>, LoadError> {
        let map_error = |source| LoadError::Map {
            map: HITS_MAP,
            source,
        };
        let map = self.ebpf.map(HITS_MAP).ok_or(LoadError::Map {
            map: HITS_MAP,
            source: aya::maps::MapError::InvalidName {
                name: HITS_MAP.into(),
            },
        })?;
        let hits: Array<&MapData, u64> = Array::try_from(map).map_err(map_error)?;
        (0..self.rule_count)
            .map(|rule_id| hits.get(&rule_id, 0).map_err(map_error))
            .collect()
    }

    /// Takes the links made by [`Self::attach`] out of the programs, so that they can be
    /// pinned. A link that is neither pinned nor kept detaches when dropped.
    pub fn take_links(&mut self) -> Result<Vec<(&'static str, FdLink)>, LoadError> {
        let mut taken = Vec::new();
        for (name, link_id) in std::mem::take(&mut self.links) {
            let program_error = |source| LoadError::Program { name, source };
            let link = match (self.program(name)?, link_id) {
                (Program::CgroupSockAddr(program), LinkId::SockAddr(id)) => program
                    .take_link(id)
                    .map_err(program_error)
                    .map(FdLink::try_from)?,
                (Program::CgroupSock(program), LinkId::Sock(id)) => program
                    .take_link(id)
                    .map_err(program_error)
                    .map(FdLink::try_from)?,
                _ => return Err(LoadError::MissingProgram(name)),
            };
            taken.push((name, link.map_err(|_| LoadError::NotALink(name))?));
        }
        Ok(taken)
    }

    /// Returns the rule id of the temporary rule of the check after attaching.
    pub fn check_rule_id(&self) -> u32 {
        self.check_rule_id
    }

    /// Returns the names of the programs the kernel accepted.
    pub fn loaded(&self) -> &[&'static str] {
        &self.loaded
    }

    /// Returns the loaded object, for callers that read its maps.
    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    /// Hands the eBPF object to callers that take maps out of it (the hit log reader).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}

/// Loads the programs of [`PROGRAMS`] that are `wanted` and returns the outcomes in that
/// order, `None` for those not wanted.
///
/// The verifier runs in the loading thread and takes no global lock for a privileged loader.
/// The programs are therefore loaded by one thread per CPU, at most four.
fn load_programs(
    ebpf: &mut Ebpf,
    wanted: &dyn Fn(&ProgramSpec) -> bool,
) -> Result<Vec<Option<Result<(), ProgramError>>>, LoadError> {
    let mut programs: Vec<(usize, &'static str, &mut Program)> = Vec::new();
    let mut by_name: std::collections::HashMap<&str, &mut Program> = ebpf.programs_mut().collect();
    for (index, spec) in PROGRAMS.iter().enumerate() {
        let name = spec.name;
        let program = by_name
            .remove(name)
            .ok_or(LoadError::MissingProgram(name))?;
        if wanted(spec) {
            programs.push((index, name, program));
        }
    }

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let mut outcomes: Vec<Option<Result<(), ProgramError>>> = Vec::new();
    outcomes.resize_with(PROGRAMS.len(), || None);
    std::thread::scope(|scope| {
        // Dealt out like cards, costliest first: the IPv6 programs take the verifier about
        // twice as long as the IPv4 ones, and the recvmsg and getpeername ones a fifth.
        programs.sort_by_key(|&(index, _, _)| (PROGRAMS[index].load_rank, index));
        let mut shares: Vec<Vec<(usize, &'static str, &mut Program)>> =
            (0..threads).map(|_| Vec::new()).collect();
        for (deal, (index, name, program)) in programs.into_iter().enumerate() {
            shares[deal % threads].push((index, name, program));
        }
        let workers: Vec<_> = shares
            .into_iter()
            .map(|share| {
                scope.spawn(move || {
                    share
                        .into_iter()
                        .map(|(index, name, program)| (index, load_one(name, program)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for worker in workers {
            for (index, outcome) in worker.join().expect("a program loading thread panicked") {
                outcomes[index] = Some(outcome);
            }
        }
    });
    // `None` for the programs not wanted.
    Ok(outcomes)
}

/// Loads one program and logs, at debug, how long the verifier took.
fn load_one(name: &str, program: &mut Program) -> Result<(), ProgramError> {
    let started = std::time::Instant::now();
    let info = match program {
        Program::CgroupSockAddr(program) => program.load().and_then(|()| program.info()),
        Program::CgroupSock(program) => program.load().and_then(|()| program.info()),
        _ => return Err(ProgramError::UnexpectedProgramType),
    };
    let verified = info?.verified_instruction_count();
    log::debug!(
        "loaded {name} in {:.1?}, {} instructions verified",
        started.elapsed(),
        verified.map_or("?".to_owned(), |count| count.to_string())
    );
    Ok(())
}

fn object_error(err: EbpfError) -> LoadError {
    let permission_denied = match &err {
        EbpfError::MapError(aya::maps::MapError::CreateError { io_error, .. }) => {
            io_error.raw_os_error() == Some(libc::EPERM)
        }
        _ => false,
    };
    if permission_denied {
        LoadError::NotPermitted
    } else {
        LoadError::Object(err)
    }
}

fn program_error(name: &'static str, err: ProgramError) -> LoadError {
    match err {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            log::debug!("verifier log of {name}:\n{log}");
            if io_error.raw_os_error() == Some(libc::EPERM) && log.trim().is_empty() {
                return LoadError::NotPermitted;
            }
            LoadError::Verifier {
                name,
                summary: summarize_verifier_log(&io_error, &log),
            }
        }
        source => LoadError::Program { name, source },
    }
}

/// Shortens a verifier log to its last lines, which name the failing instruction.
fn summarize_verifier_log(io_error: &std::io::Error, log: &str) -> String {
    let lines: Vec<&str> = log
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    let shown = &lines[lines.len().saturating_sub(VERIFIER_LINES_SHOWN)..];
    let omitted = lines.len() - shown.len();
    let mut summary = format!("{io_error}; verifier log: {}", shown.join(" | "));
    if omitted > 0 {
        summary.push_str(&format!(
            " ({omitted} earlier lines omitted; run with -vv for all)"
        ));
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_summary_keeps_last_lines() {
        let log: String = (1..=10).map(|i| format!("line {i}\n\n")).collect();
        let err = std::io::Error::from_raw_os_error(libc::EACCES);
        let summary = summarize_verifier_log(&err, &log);
        assert!(
            summary.contains("verifier log: line 5 | line 6"),
            "{summary}"
        );
        assert!(summary.ends_with("line 10 (4 earlier lines omitted; run with -vv for all)"));
    }
}
