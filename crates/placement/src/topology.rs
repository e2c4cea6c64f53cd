//! The topology model: nodes, their fault domains and states, their disks and
//! free extents.
//!
//! Job: hold what placement needs to know about the cluster, validated, in a
//! deterministic order, with the per-node summaries the algorithms read on
//! every decision kept up to date.
//!
//! Invariants, checked on every mutation:
//! - at most [`NODES_MAX`] nodes, at most [`DISKS_PER_NODE_MAX`] disks per node,
//!   node ids and disk ids unique across the topology;
//! - every disk has `1 <= capacity_extents <= DISK_EXTENTS_MAX` and
//!   `free_extents <= capacity_extents`;
//! - nodes are kept sorted by [`NodeId`] and disks by [`DiskId`], so every
//!   iteration (and so every decision) is the same for the same input;
//! - the derived fields (domain index per level, best disk, allocatable free
//!   extents) always match the nodes and disks they summarise.
//!
//! The topology does no I/O: the daemon builds it from its metadata and
//! updates it as extents are taken and released.

use std::fmt;
use std::str::FromStr;

use crate::error::PlacementError;
use crate::fill::Fill;

/// The most nodes a cluster may have (as in Storage Spaces Direct).
pub const NODES_MAX: usize = 16;
/// The most disks one node may have.
pub const DISKS_PER_NODE_MAX: usize = 64;
/// The most extents one disk may have (2^40: an exbibyte of 1 MiB extents).
/// Keeps every fill comparison exact in `u128`.
pub const DISK_EXTENTS_MAX: u64 = 1 << 40;
/// Longest fault-domain path component, in bytes.
pub const DOMAIN_NAME_LEN_MAX: usize = 64;

// Domain indices are kept in a `u8` and sets of domains in a `u32` bit mask.
const _: () = assert!(NODES_MAX <= 32);
const _: () = assert!(DISKS_PER_NODE_MAX <= u16::MAX as usize);

/// A node (one server running `storaged`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u32);

/// A disk. The daemon uses the UUID written in the disk's superblock
/// (`Uuid::as_u128`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DiskId(pub u128);

/// A slab of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlabId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for DiskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for SlabId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where one extent lives: a disk and the node that holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExtentLocation {
    pub node: NodeId,
    pub disk: DiskId,
}

/// What a node is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NodeState {
    /// Serving reads and writes; takes new extents.
    Up,
    /// Failed or unreachable. Its extents are lost until it comes back; a
    /// rebuild plan replaces them (the daemon asks for one only once the node
    /// has been down for `rebuild_after`).
    Down,
    /// Deliberately paused (patching, reboot). Its extents are unavailable but
    /// expected back: they are never rebuilt, and they take no new extents.
    Maintenance,
    /// Leaving the cluster for good. It still serves reads, takes no new
    /// extents, and every extent on it is moved off (drained).
    Retired,
}

/// What a disk is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DiskState {
    /// Serving reads and writes; takes new extents.
    Healthy,
    /// Predicted to fail (SMART, rising error counts): still readable, takes
    /// no new extents, its extents are moved off.
    Failing,
    /// Dead: its extents are lost and get rebuilt.
    Failed,
    /// Being removed by the operator: still readable, takes no new extents,
    /// its extents are moved off.
    Retired,
}

/// The levels of the fault-domain tree, widest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DomainLevel {
    Site,
    Rack,
    Chassis,
    Node,
}

impl DomainLevel {
    /// Every level, widest first: the order in which placement tries them.
    pub const ALL: [DomainLevel; 4] = [
        DomainLevel::Site,
        DomainLevel::Rack,
        DomainLevel::Chassis,
        DomainLevel::Node,
    ];

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for DomainLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DomainLevel::Site => "site",
            DomainLevel::Rack => "rack",
            DomainLevel::Chassis => "chassis",
            DomainLevel::Node => "node",
        })
    }
}

/// A node's place in the fault-domain tree: `site/rack/chassis/node`, where
/// any prefix may be omitted (`node`, `chassis/node`, `rack/chassis/node`).
///
/// Components are matched from the right, so `r1/c2/n3` is rack `r1`, chassis
/// `c2`, node `n3`, and `r1/n3` is chassis `r1` (write `r1/c/n3` to name a
/// rack; only the order of levels matters to placement, the names are for
/// people). Two nodes share a domain at a level when their paths agree
/// on every component down to that level; an omitted component counts as one
/// unnamed domain, so nodes that name no rack are all in the same (unnamed)
/// rack. The node component is a label: at the node level every node is its
/// own domain, whatever its name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FaultDomain {
    site: Option<String>,
    rack: Option<String>,
    chassis: Option<String>,
    node: String,
}

impl FaultDomain {
    /// Parse `site/rack/chassis/node` (any prefix may be omitted). Components
    /// are 1 to 64 bytes of ASCII letters, digits, `-`, `_`, `.` or `:`.
    pub fn parse(path: &str) -> Result<Self, PlacementError> {
        let refuse = |reason: &'static str| PlacementError::InvalidFaultDomain {
            path: path.to_string(),
            reason,
        };
        if path.is_empty() {
            return Err(refuse("empty path"));
        }
        let parts: Vec<&str> = path.split('/').collect();
        if parts.len() > 4 {
            return Err(refuse(
                "more than 4 components (expected site/rack/chassis/node)",
            ));
        }
        for part in &parts {
            if part.is_empty() {
                return Err(refuse("empty component"));
            }
            if part.len() > DOMAIN_NAME_LEN_MAX {
                return Err(refuse("component longer than 64 bytes"));
            }
            let allowed = |b: u8| b.is_ascii_alphanumeric() || b"-_.:".contains(&b);
            if !part.bytes().all(allowed) {
                return Err(refuse(
                    "components may hold only ASCII letters, digits, '-', '_', '.' and ':'",
                ));
            }
        }
        let mut names: [Option<String>; 4] = [None, None, None, None];
        let offset = 4 - parts.len();
        for (i, part) in parts.iter().enumerate() {
            names[offset + i] = Some((*part).to_string());
        }
        let [site, rack, chassis, node] = names;
        Ok(Self {
            site,
            rack,
            chassis,
            node: node.unwrap_or_default(),
        })
    }

    pub fn site(&self) -> Option<&str> {
        self.site.as_deref()
    }

    pub fn rack(&self) -> Option<&str> {
        self.rack.as_deref()
    }

    pub fn chassis(&self) -> Option<&str> {
        self.chassis.as_deref()
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The components down to `level` (site, rack, chassis), `None` where
    /// omitted. Two nodes share a domain at `level` above the node level
    /// exactly when these are equal.
    fn key(&self, level: DomainLevel) -> [Option<&str>; 3] {
        let all = [self.site(), self.rack(), self.chassis()];
        let mut key = [None; 3];
        let depth = level.index().min(2) + 1;
        key[..depth].copy_from_slice(&all[..depth]);
        key
    }
}

impl fmt::Display for FaultDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for part in [self.site(), self.rack(), self.chassis()]
            .into_iter()
            .flatten()
            .chain([self.node()])
        {
            if !first {
                f.write_str("/")?;
            }
            f.write_str(part)?;
            first = false;
        }
        Ok(())
    }
}

impl FromStr for FaultDomain {
    type Err = PlacementError;

    fn from_str(path: &str) -> Result<Self, Self::Err> {
        Self::parse(path)
    }
}

/// A disk as handed to [`Topology::add_disk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskSpec {
    pub id: DiskId,
    pub capacity_extents: u64,
    pub free_extents: u64,
    pub state: DiskState,
}

impl DiskSpec {
    /// An empty, healthy disk.
    pub fn empty(id: DiskId, capacity_extents: u64) -> Self {
        Self {
            id,
            capacity_extents,
            free_extents: capacity_extents,
            state: DiskState::Healthy,
        }
    }
}

/// One disk of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    id: DiskId,
    capacity_extents: u64,
    free_extents: u64,
    state: DiskState,
}

impl Disk {
    pub fn id(&self) -> DiskId {
        self.id
    }

    pub fn capacity_extents(&self) -> u64 {
        self.capacity_extents
    }

    pub fn free_extents(&self) -> u64 {
        self.free_extents
    }

    pub fn used_extents(&self) -> u64 {
        self.capacity_extents - self.free_extents
    }

    pub fn state(&self) -> DiskState {
        self.state
    }

    /// Used fraction of the disk, for display (decisions use exact fractions).
    pub fn fill(&self) -> f64 {
        self.used_extents() as f64 / self.capacity_extents as f64
    }

    pub(crate) fn fill_after_one_more(&self) -> Fill {
        Fill::after_one_more(self.used_extents(), self.capacity_extents)
    }
}

/// One node: its fault domain, state and disks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    id: NodeId,
    fault_domain: FaultDomain,
    state: NodeState,
    /// Sorted by id.
    disks: Vec<Disk>,
    /// Derived: this node's domain index at each level (at the node level,
    /// the node's index in the topology). Equal indices = same domain.
    domains: [u8; 4],
    /// Derived: the disk a new extent on this node would go to (healthy, has
    /// a free extent, lowest fill after one more extent), if the node is up.
    best_disk: Option<u16>,
    /// Derived: free extents on this node's healthy disks if the node is up.
    allocatable_free: u64,
    /// Derived: the best disk's fill after one more extent, in units of
    /// 2^-32 (so 2^32 is full), for fast comparisons.
    best_score: u64,
}

impl Node {
    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn fault_domain(&self) -> &FaultDomain {
        &self.fault_domain
    }

    pub fn state(&self) -> NodeState {
        self.state
    }

    /// The node's disks, sorted by id.
    pub fn disks(&self) -> &[Disk] {
        &self.disks
    }

    pub fn disk(&self, id: DiskId) -> Option<&Disk> {
        self.disk_index(id).map(|i| &self.disks[i])
    }

    /// Capacity of every disk of the node, whatever its state.
    pub fn capacity_extents(&self) -> u64 {
        self.disks.iter().map(|d| d.capacity_extents).sum()
    }

    /// Free extents a new slab could use now: on healthy disks, if the node
    /// is up.
    pub fn allocatable_free_extents(&self) -> u64 {
        self.allocatable_free
    }

    /// Capacity of the disks that take new extents (healthy, node up).
    pub fn allocatable_capacity_extents(&self) -> u64 {
        if self.state != NodeState::Up {
            return 0;
        }
        self.disks
            .iter()
            .filter(|d| d.state == DiskState::Healthy)
            .map(|d| d.capacity_extents)
            .sum()
    }

    pub(crate) fn disk_index(&self, id: DiskId) -> Option<usize> {
        self.disks.binary_search_by_key(&id, |d| d.id).ok()
    }

    pub(crate) fn domain(&self, level: DomainLevel) -> u8 {
        self.domains[level.index()]
    }

    pub(crate) fn best_disk(&self) -> Option<usize> {
        self.best_disk.map(usize::from)
    }

    /// True when the node is up and has at least one healthy disk, free or
    /// not: it counts as an available fault domain.
    pub(crate) fn is_usable_domain(&self) -> bool {
        self.state == NodeState::Up && self.disks.iter().any(|d| d.state == DiskState::Healthy)
    }

    /// The best disk's fill after one more extent, as a fixed-point
    /// fraction of 2^32; `None` if the node takes no new extent.
    pub(crate) fn best_score(&self) -> Option<u64> {
        self.best_disk.map(|_| self.best_score)
    }

    /// Recompute the derived per-node fields from the disks.
    fn refresh(&mut self) {
        self.best_disk = None;
        self.allocatable_free = 0;
        self.best_score = u64::MAX;
        if self.state != NodeState::Up {
            return;
        }
        let mut best: Option<(Fill, usize)> = None;
        for (i, disk) in self.disks.iter().enumerate() {
            if disk.state != DiskState::Healthy || disk.free_extents == 0 {
                continue;
            }
            self.allocatable_free += disk.free_extents;
            let fill = disk.fill_after_one_more();
            if best.is_none_or(|(b, _)| fill < b) {
                best = Some((fill, i));
            }
        }
        if let Some((_, i)) = best {
            let disk = &self.disks[i];
            let after = disk.used_extents() + 1;
            self.best_score = if after < 1 << 32 {
                (after << 32) / disk.capacity_extents
            } else {
                (((after as u128) << 32) / disk.capacity_extents as u128) as u64
            };
            self.best_disk = Some(i as u16);
        }
    }
}

/// How one extent of a slab stands, given where it lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CopyState {
    /// Up node, healthy disk: in good standing.
    Good,
    /// Readable, but on hardware that is leaving (retired node, retired or
    /// failing disk): it must be moved off.
    Leaving,
    /// On a node in maintenance: unavailable now, expected back, kept.
    Paused,
    /// On a down node or a failed disk: gone, must be rebuilt.
    Lost,
}

impl CopyState {
    pub(crate) fn is_readable(self) -> bool {
        matches!(self, CopyState::Good | CopyState::Leaving)
    }

    /// The copy stays part of the slab (is not replaced by a plan).
    pub(crate) fn is_kept(self) -> bool {
        matches!(self, CopyState::Good | CopyState::Paused)
    }
}

/// Nodes, fault domains, disks and free extents of one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    extent_size_bytes: u64,
    /// Sorted by id; at most `NODES_MAX`.
    nodes: Vec<Node>,
}

impl Topology {
    /// An empty topology for a pool whose extents are `extent_size_bytes`
    /// long (used only to turn extent counts into bytes).
    pub fn new(extent_size_bytes: u64) -> Result<Self, PlacementError> {
        if extent_size_bytes == 0 {
            return Err(PlacementError::InvalidExtentSize);
        }
        Ok(Self {
            extent_size_bytes,
            nodes: Vec::new(),
        })
    }

    pub fn extent_size_bytes(&self) -> u64 {
        self.extent_size_bytes
    }

    /// Add a node without disks. Refuses the 17th node, and a duplicate id.
    pub fn add_node(
        &mut self,
        id: NodeId,
        fault_domain: FaultDomain,
        state: NodeState,
    ) -> Result<(), PlacementError> {
        let at = match self.nodes.binary_search_by_key(&id, |n| n.id) {
            Ok(_) => return Err(PlacementError::DuplicateNode(id)),
            Err(at) => at,
        };
        if self.nodes.len() >= NODES_MAX {
            return Err(PlacementError::TooManyNodes { node: id });
        }
        let mut node = Node {
            id,
            fault_domain,
            state,
            disks: Vec::new(),
            domains: [0; 4],
            best_disk: None,
            allocatable_free: 0,
            best_score: u64::MAX,
        };
        node.refresh();
        self.nodes.insert(at, node);
        self.refresh_domains();
        Ok(())
    }

    /// Add a disk to a node.
    pub fn add_disk(&mut self, node: NodeId, spec: DiskSpec) -> Result<(), PlacementError> {
        let ni = self
            .node_index(node)
            .ok_or(PlacementError::UnknownNode(node))?;
        if self.node_of_disk(spec.id).is_some() {
            return Err(PlacementError::DuplicateDisk(spec.id));
        }
        if spec.capacity_extents == 0 || spec.capacity_extents > DISK_EXTENTS_MAX {
            return Err(PlacementError::InvalidDisk {
                disk: spec.id,
                reason: format!(
                    "capacity {} extents is outside 1..={DISK_EXTENTS_MAX}",
                    spec.capacity_extents
                ),
            });
        }
        if spec.free_extents > spec.capacity_extents {
            return Err(PlacementError::InvalidDisk {
                disk: spec.id,
                reason: format!(
                    "{} free extents is more than its capacity of {}",
                    spec.free_extents, spec.capacity_extents
                ),
            });
        }
        let n = &mut self.nodes[ni];
        if n.disks.len() >= DISKS_PER_NODE_MAX {
            return Err(PlacementError::TooManyDisks {
                node,
                disk: spec.id,
            });
        }
        let at = n.disks.partition_point(|d| d.id < spec.id);
        n.disks.insert(
            at,
            Disk {
                id: spec.id,
                capacity_extents: spec.capacity_extents,
                free_extents: spec.free_extents,
                state: spec.state,
            },
        );
        n.refresh();
        Ok(())
    }

    /// Remove a node and its disks (once it is empty, or written off).
    pub fn remove_node(&mut self, id: NodeId) -> Result<Node, PlacementError> {
        let ni = self.node_index(id).ok_or(PlacementError::UnknownNode(id))?;
        let node = self.nodes.remove(ni);
        self.refresh_domains();
        Ok(node)
    }

    /// Remove a disk.
    pub fn remove_disk(&mut self, id: DiskId) -> Result<Disk, PlacementError> {
        let (ni, di) = self
            .disk_position(id)
            .ok_or(PlacementError::UnknownDisk(id))?;
        let node = &mut self.nodes[ni];
        let disk = node.disks.remove(di);
        node.refresh();
        Ok(disk)
    }

    pub fn set_node_state(&mut self, id: NodeId, state: NodeState) -> Result<(), PlacementError> {
        let ni = self.node_index(id).ok_or(PlacementError::UnknownNode(id))?;
        self.nodes[ni].state = state;
        self.nodes[ni].refresh();
        Ok(())
    }

    pub fn set_fault_domain(
        &mut self,
        id: NodeId,
        fault_domain: FaultDomain,
    ) -> Result<(), PlacementError> {
        let ni = self.node_index(id).ok_or(PlacementError::UnknownNode(id))?;
        self.nodes[ni].fault_domain = fault_domain;
        self.refresh_domains();
        Ok(())
    }

    pub fn set_disk_state(&mut self, id: DiskId, state: DiskState) -> Result<(), PlacementError> {
        let (ni, di) = self
            .disk_position(id)
            .ok_or(PlacementError::UnknownDisk(id))?;
        self.nodes[ni].disks[di].state = state;
        self.nodes[ni].refresh();
        Ok(())
    }

    /// Set a disk's free extent count (as the extent store reports it).
    pub fn set_disk_free(&mut self, id: DiskId, free_extents: u64) -> Result<(), PlacementError> {
        let (ni, di) = self
            .disk_position(id)
            .ok_or(PlacementError::UnknownDisk(id))?;
        let disk = &mut self.nodes[ni].disks[di];
        if free_extents > disk.capacity_extents {
            return Err(PlacementError::InvalidDisk {
                disk: id,
                reason: format!(
                    "{free_extents} free extents is more than its capacity of {}",
                    disk.capacity_extents
                ),
            });
        }
        disk.free_extents = free_extents;
        self.nodes[ni].refresh();
        Ok(())
    }

    /// Take one free extent of `location`'s disk (an allocation or a rebuild
    /// or move target was committed).
    pub fn take_extent(&mut self, location: ExtentLocation) -> Result<(), PlacementError> {
        let (ni, di) = self.locate(location)?;
        self.take_at(ni, di)
    }

    /// Take one free extent of disk `di` of node `ni`.
    pub(crate) fn take_at(&mut self, ni: usize, di: usize) -> Result<(), PlacementError> {
        let disk = &mut self.nodes[ni].disks[di];
        if disk.free_extents == 0 {
            return Err(PlacementError::DiskFull { disk: disk.id });
        }
        disk.free_extents -= 1;
        self.nodes[ni].refresh();
        Ok(())
    }

    /// Give one extent of `location`'s disk back (a slab was deleted, or a
    /// moved or replaced copy was removed).
    pub fn release_extent(&mut self, location: ExtentLocation) -> Result<(), PlacementError> {
        let (ni, di) = self.locate(location)?;
        let disk = &mut self.nodes[ni].disks[di];
        if disk.free_extents >= disk.capacity_extents {
            return Err(PlacementError::DiskEmpty { disk: disk.id });
        }
        disk.free_extents += 1;
        self.nodes[ni].refresh();
        Ok(())
    }

    /// Take every extent of a newly allocated slab, all or nothing.
    pub fn commit(&mut self, extents: &[ExtentLocation]) -> Result<(), PlacementError> {
        for (taken, &location) in extents.iter().enumerate() {
            if let Err(e) = self.take_extent(location) {
                for &undo in &extents[..taken] {
                    // Cannot fail: this extent was taken just above.
                    let _ = self.release_extent(undo);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Nodes in id order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.node_index(id).map(|i| &self.nodes[i])
    }

    pub fn disk(&self, id: DiskId) -> Option<&Disk> {
        self.disk_position(id)
            .map(|(ni, di)| &self.nodes[ni].disks[di])
    }

    /// The node that holds disk `id`.
    pub fn node_of_disk(&self, id: DiskId) -> Option<&Node> {
        self.disk_position(id).map(|(ni, _)| &self.nodes[ni])
    }

    /// A number that changes with every extent taken or released, to vary
    /// tie-breaks from one decision to the next (see
    /// [`crate::select::jitter`]).
    pub(crate) fn seed(&self) -> u64 {
        self.nodes.iter().map(|n| n.allocatable_free).sum()
    }

    pub(crate) fn node_index(&self, id: NodeId) -> Option<usize> {
        self.nodes.binary_search_by_key(&id, |n| n.id).ok()
    }

    fn disk_position(&self, id: DiskId) -> Option<(usize, usize)> {
        self.nodes
            .iter()
            .enumerate()
            .find_map(|(ni, n)| n.disk_index(id).map(|di| (ni, di)))
    }

    /// Indices of `location`'s node and disk, checking the disk is on that
    /// node.
    pub(crate) fn locate(
        &self,
        location: ExtentLocation,
    ) -> Result<(usize, usize), PlacementError> {
        if let Some(ni) = self.node_index(location.node)
            && let Some(di) = self.nodes[ni].disk_index(location.disk)
        {
            return Ok((ni, di));
        }
        match self.node_of_disk(location.disk) {
            Some(actual) => Err(PlacementError::WrongNode {
                disk: location.disk,
                claimed: location.node,
                actual: actual.id,
            }),
            None => Err(PlacementError::UnknownDisk(location.disk)),
        }
    }

    pub(crate) fn location(&self, ni: usize, di: usize) -> ExtentLocation {
        let node = &self.nodes[ni];
        ExtentLocation {
            node: node.id,
            disk: node.disks[di].id,
        }
    }

    /// How a copy on disk `di` of node `ni` stands.
    pub(crate) fn copy_state(&self, ni: usize, di: usize) -> CopyState {
        let node = &self.nodes[ni];
        let disk = node.disks[di].state;
        if disk == DiskState::Failed {
            return CopyState::Lost;
        }
        match node.state {
            NodeState::Down => CopyState::Lost,
            NodeState::Maintenance => CopyState::Paused,
            NodeState::Retired => CopyState::Leaving,
            NodeState::Up => match disk {
                DiskState::Healthy => CopyState::Good,
                DiskState::Failing | DiskState::Retired | DiskState::Failed => CopyState::Leaving,
            },
        }
    }

    /// Disk `di` of node `ni` may receive new extents (ignoring free space).
    pub(crate) fn is_target(&self, ni: usize, di: usize) -> bool {
        let node = &self.nodes[ni];
        node.state == NodeState::Up && node.disks[di].state == DiskState::Healthy
    }

    /// Recompute every node's domain index at every level.
    fn refresh_domains(&mut self) {
        for level in [DomainLevel::Site, DomainLevel::Rack, DomainLevel::Chassis] {
            let mut keys: Vec<[Option<&str>; 3]> = self
                .nodes
                .iter()
                .map(|n| n.fault_domain.key(level))
                .collect();
            keys.sort_unstable();
            keys.dedup();
            let indices: Vec<u8> = self
                .nodes
                .iter()
                .map(|n| {
                    let key = n.fault_domain.key(level);
                    // Always found: `keys` holds every node's key. At most
                    // NODES_MAX keys, so the index fits in a u8.
                    keys.binary_search(&key).unwrap_or(0) as u8
                })
                .collect();
            for (node, index) in self.nodes.iter_mut().zip(indices) {
                node.domains[level.index()] = index;
            }
        }
        for (i, node) in self.nodes.iter_mut().enumerate() {
            node.domains[DomainLevel::Node.index()] = i as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(path: &str) -> FaultDomain {
        FaultDomain::parse(path).expect(path)
    }

    #[test]
    fn fault_domain_paths_match_from_the_right() {
        let d = domain("s1/r1/c2/n3");
        assert_eq!(
            (d.site(), d.rack(), d.chassis(), d.node()),
            (Some("s1"), Some("r1"), Some("c2"), "n3")
        );
        let d = domain("r1/c2/n3");
        assert_eq!(
            (d.site(), d.rack(), d.chassis(), d.node()),
            (None, Some("r1"), Some("c2"), "n3")
        );
        let d = domain("n3");
        assert_eq!(
            (d.site(), d.rack(), d.chassis(), d.node()),
            (None, None, None, "n3")
        );
        for path in ["s1/r1/c2/n3", "r1/c2/n3", "c2/n3", "n3"] {
            assert_eq!(domain(path).to_string(), path);
        }
        for bad in ["", "a/b/c/d/e", "a//b", "/a", "a/", "a b", "ä"] {
            let err = FaultDomain::parse(bad).expect_err(bad);
            assert_eq!(err.code(), "S2D:Placement:InvalidFaultDomain");
        }
        assert!(FaultDomain::parse(&"x".repeat(DOMAIN_NAME_LEN_MAX + 1)).is_err());
    }

    #[test]
    fn seventeenth_node_is_refused_with_the_cap() {
        let mut t = Topology::new(1 << 20).expect("topology");
        for i in 0..NODES_MAX as u32 {
            t.add_node(NodeId(i), domain(&format!("n{i}")), NodeState::Up)
                .expect("node");
        }
        let err = t
            .add_node(NodeId(99), domain("n99"), NodeState::Up)
            .expect_err("17th");
        assert_eq!(err, PlacementError::TooManyNodes { node: NodeId(99) });
        assert!(err.to_string().contains("16 nodes"), "{err}");
        assert_eq!(t.node_count(), NODES_MAX);
        let err = t
            .add_node(NodeId(3), domain("n3"), NodeState::Up)
            .expect_err("dup");
        assert_eq!(err, PlacementError::DuplicateNode(NodeId(3)));
    }

    #[test]
    fn disks_are_validated() {
        let mut t = Topology::new(1 << 20).expect("topology");
        t.add_node(NodeId(1), domain("n1"), NodeState::Up)
            .expect("node");
        let err = t
            .add_disk(NodeId(2), DiskSpec::empty(DiskId(1), 10))
            .expect_err("no node");
        assert_eq!(err, PlacementError::UnknownNode(NodeId(2)));
        assert!(
            t.add_disk(NodeId(1), DiskSpec::empty(DiskId(1), 0))
                .is_err()
        );
        assert!(
            t.add_disk(NodeId(1), DiskSpec::empty(DiskId(1), DISK_EXTENTS_MAX + 1))
                .is_err()
        );
        let mut spec = DiskSpec::empty(DiskId(1), 10);
        spec.free_extents = 11;
        assert!(t.add_disk(NodeId(1), spec).is_err());
        t.add_disk(NodeId(1), DiskSpec::empty(DiskId(1), 10))
            .expect("disk");
        assert_eq!(
            t.add_disk(NodeId(1), DiskSpec::empty(DiskId(1), 10)),
            Err(PlacementError::DuplicateDisk(DiskId(1)))
        );
        for i in 2..=DISKS_PER_NODE_MAX as u128 {
            t.add_disk(NodeId(1), DiskSpec::empty(DiskId(i), 10))
                .expect("disk");
        }
        let err = t
            .add_disk(NodeId(1), DiskSpec::empty(DiskId(1000), 10))
            .expect_err("too many");
        assert_eq!(err.code(), "S2D:Placement:TooManyDisks");
    }

    #[test]
    fn take_and_release_keep_counts_in_range() {
        let mut t = Topology::new(1 << 20).expect("topology");
        t.add_node(NodeId(1), domain("n1"), NodeState::Up)
            .expect("node");
        t.add_disk(NodeId(1), DiskSpec::empty(DiskId(7), 1))
            .expect("disk");
        let here = ExtentLocation {
            node: NodeId(1),
            disk: DiskId(7),
        };
        assert_eq!(
            t.release_extent(here),
            Err(PlacementError::DiskEmpty { disk: DiskId(7) })
        );
        t.take_extent(here).expect("take");
        assert_eq!(
            t.take_extent(here),
            Err(PlacementError::DiskFull { disk: DiskId(7) })
        );
        assert_eq!(t.disk(DiskId(7)).map(Disk::free_extents), Some(0));
        let wrong = ExtentLocation {
            node: NodeId(2),
            disk: DiskId(7),
        };
        assert_eq!(
            t.release_extent(wrong),
            Err(PlacementError::WrongNode {
                disk: DiskId(7),
                claimed: NodeId(2),
                actual: NodeId(1)
            })
        );
        // commit is all or nothing
        t.release_extent(here).expect("release");
        assert!(t.commit(&[here, here]).is_err());
        assert_eq!(t.disk(DiskId(7)).map(Disk::free_extents), Some(1));
    }

    #[test]
    fn domains_group_nodes_by_path_prefix() {
        let mut t = Topology::new(1 << 20).expect("topology");
        let paths = ["r1/c1/a", "r1/c2/b", "r2/c1/c", "d", "e"];
        for (i, p) in paths.iter().enumerate() {
            t.add_node(NodeId(i as u32), domain(p), NodeState::Up)
                .expect("node");
        }
        let at = |i: usize, level| t.nodes()[i].domain(level);
        // racks: r1, r1, r2, unnamed, unnamed
        assert_eq!(at(0, DomainLevel::Rack), at(1, DomainLevel::Rack));
        assert_ne!(at(0, DomainLevel::Rack), at(2, DomainLevel::Rack));
        assert_eq!(at(3, DomainLevel::Rack), at(4, DomainLevel::Rack));
        assert_ne!(at(3, DomainLevel::Rack), at(0, DomainLevel::Rack));
        // chassis c1 under r1 and c1 under r2 differ
        assert_ne!(at(0, DomainLevel::Chassis), at(2, DomainLevel::Chassis));
        assert_ne!(at(0, DomainLevel::Chassis), at(1, DomainLevel::Chassis));
        // every node is its own node-level domain
        for i in 0..paths.len() {
            for j in 0..paths.len() {
                assert_eq!(i == j, at(i, DomainLevel::Node) == at(j, DomainLevel::Node));
            }
        }
    }
}
