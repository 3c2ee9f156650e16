//! The compiled automaton: one trie over reversed labels for every pattern of a rule set.
//!
//! Nodes are reached from the root by the name's labels right to left (`com`, `cilium`, ...).
//! Each node may carry
//! - a *terminal* rule set: patterns that end exactly here (`cilium.io`, `*.cilium.io`),
//! - a *subtree* rule set: `**.` patterns whose suffix ends here (one or more labels remain),
//! - an *any* child: the next label is a whole-label `*`,
//! - *glob* children: the next label is a glob such as `api-*`.
//!
//! Exact children live in one hash table keyed by (parent, label), made of 64-byte groups (one
//! cache line each): 12 one-byte tags, 12 child ids and a count of the edges stored past the
//! group. A lookup step hashes the label, compares its tag with the 12 tags of one group and,
//! on a tag match, checks the candidate child node, which holds its own parent and label (the
//! first 7 label bytes inline): about one cache line for a miss and two (the group, then the
//! child node the walk reads next anyway) for a hit, whatever the number of patterns. The trie
//! is a tree: a node is reached by one path only, so a lookup visits each node at most once even
//! when globs open several paths.

use std::collections::HashMap;
use std::ops::ControlFlow;

use crate::name::Name;
use crate::pattern::{LabelKind, Pattern, Shape, collapse_stars, glob_match};

/// A caller-chosen tag for a pattern (a policy rule, a selector). Lookups report the tags of the
/// patterns that match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleId(pub u32);

const NONE: u32 = u32::MAX;

/// A trie node: 32 bytes, aligned so that one never straddles two cache lines.
#[derive(Debug, Clone, Copy)]
#[repr(align(32))]
struct Node {
    /// Rule set of patterns ending here, or `NONE`.
    terminal: u32,
    /// Rule set of `**.` patterns ending here, or `NONE`.
    subtree: u32,
    /// Child through a whole-label `*`, or `NONE`.
    any: u32,
    /// This node's glob edges (index into `Matcher::glob_ranges`), or `NONE`: most nodes have
    /// none, so their ranges live apart.
    globs: u32,
    /// For a child through an exact edge: its parent (`NONE` otherwise), ...
    parent: u32,
    /// ... the label's bytes in `Matcher::bytes` ...
    label_off: u32,
    /// ... and [`label_head`] of the label: its length byte and first 7 bytes, so a label of
    /// up to 7 bytes is compared without reading `bytes`.
    head: u64,
}

impl Node {
    const EMPTY: Node = Node {
        terminal: NONE,
        subtree: NONE,
        any: NONE,
        globs: NONE,
        parent: NONE,
        label_off: 0,
        head: 0,
    };
}

// A node is half a cache line and a group a whole one; a change of layout should be deliberate.
const _: () = assert!(std::mem::size_of::<Node>() == 32);
const _: () = assert!(std::mem::size_of::<Group>() == 64);

/// The glob edges of one node in `Matcher::globs`.
#[derive(Debug, Clone, Copy)]
struct GlobRange {
    /// First the `star` globs with a star at both ends, ...
    start: u32,
    len: u32,
    star: u32,
    /// ... then `suffix` globs that start with `*` but end with a literal byte, sorted by
    /// their last byte; the rest start with a literal byte, sorted by it.
    suffix: u32,
}

#[derive(Debug, Clone, Copy)]
struct GlobEdge {
    /// Glob bytes in `Matcher::bytes`.
    off: u32,
    len: u32,
    child: u32,
}

/// Edges per group of the exact-edge table.
const GROUP: usize = 12;

/// Average edges per group the table is sized for (load factor 2/3): few groups overflow.
const GROUP_LOAD: usize = 8;

/// One cache line of the exact-edge table: up to 12 edges, each as a one-byte tag from its
/// hash (0: free) and its child node, which holds the parent and label to compare.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct Group {
    /// Little-endian: bytes 0..12 the tags, bytes 12..16 the number of edges stored past this
    /// group whose probe went through it (a lookup that finds no match here stops when it is 0).
    header: u128,
    children: [u32; GROUP],
}

impl Group {
    fn tag(&self, j: usize) -> u8 {
        (self.header >> (8 * j)) as u8
    }

    fn passed(&self) -> u32 {
        (self.header >> 96) as u32
    }
}

const EMPTY_GROUP: Group = Group {
    header: 0,
    children: [NONE; GROUP],
};

/// The tag of an edge hash: never 0 (which marks a free entry), from other bits than the
/// group index.
#[inline]
fn tag(hash: u64) -> u8 {
    ((hash >> 24) as u8).max(1)
}

/// A label's length and first 7 bytes as one word (little-endian: the length in the low byte),
/// the rest zero. [`Name::label_and_head`] computes the same word from the name's wire form.
fn label_head(label: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    word[0] = label.len().min(255) as u8;
    let n = label.len().min(7);
    word[1..1 + n].copy_from_slice(&label[..n]);
    u64::from_le_bytes(word)
}

/// Collects patterns with their rule ids, then compiles them into a [`Matcher`].
#[derive(Debug, Default, Clone)]
pub struct MatcherBuilder {
    entries: Vec<(Pattern, RuleId)>,
}

impl MatcherBuilder {
    /// An empty builder.
    pub fn new() -> MatcherBuilder {
        MatcherBuilder::default()
    }

    /// Adds `pattern`, tagged `rule`. The same pattern may be added with several rules.
    pub fn add(&mut self, pattern: Pattern, rule: RuleId) -> &mut MatcherBuilder {
        self.entries.push((pattern, rule));
        self
    }

    /// Number of patterns added so far.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no pattern was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Compiles every pattern into one automaton.
    pub fn build(&self) -> Matcher {
        Compiler::default().compile(&self.entries)
    }
}

/// FxHash: a fast, non-cryptographic hasher for build-time maps (keys come from the policy
/// author, not from the network).
#[derive(Default, Clone, Copy)]
struct FxHasher(u64);

impl std::hash::Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.add(u64::from_le_bytes(chunk.try_into().expect("8-byte chunk")));
        }
        for &b in chunks.remainder() {
            self.add(u64::from(b));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

type FxMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<FxHasher>>;

/// Build-time state: hash maps that the frozen [`Matcher`] replaces with flat arrays.
#[derive(Default)]
struct Compiler {
    nodes: Vec<Node>,
    bytes: Vec<u8>,
    /// Interned label and glob bytes → offset in `bytes`.
    interned: FxMap<Box<[u8]>, u32>,
    /// (parent, label offset, label length) → child.
    exact: FxMap<(u32, u32, u8), u32>,
    /// (node, glob offset, glob length, child), in insertion order.
    globs: Vec<(u32, u32, u32, u32)>,
    /// (node, glob offset, glob length) → child, to share glob edges.
    glob_index: FxMap<(u32, u32, u32), u32>,
    /// (node, rule) of patterns ending at node; of `**.` patterns ending at node.
    terminal_rules: Vec<(u32, RuleId)>,
    subtree_rules: Vec<(u32, RuleId)>,
    /// Scratch for collapsing stars.
    scratch: Vec<u8>,
}

impl Compiler {
    fn intern(&mut self, bytes: &[u8]) -> u32 {
        if let Some(&off) = self.interned.get(bytes) {
            return off;
        }
        let off = u32::try_from(self.bytes.len()).expect("pattern bytes exceed 4 GiB");
        self.bytes.extend_from_slice(bytes);
        self.interned.insert(bytes.into(), off);
        off
    }

    fn new_node(&mut self) -> u32 {
        let id = u32::try_from(self.nodes.len()).expect("more than 2^32 trie nodes");
        assert!(id != NONE, "more than 2^32 - 1 trie nodes");
        self.nodes.push(Node::EMPTY);
        id
    }

    fn child(&mut self, parent: u32, kind: LabelKind, bytes: &[u8]) -> u32 {
        match kind {
            LabelKind::Any => {
                let any = self.nodes[parent as usize].any;
                if any != NONE {
                    return any;
                }
                let child = self.new_node();
                self.nodes[parent as usize].any = child;
                child
            }
            LabelKind::Literal => {
                // Labels of validated patterns are at most 255 bytes.
                let key = (parent, self.intern(bytes), bytes.len().min(255) as u8);
                if let Some(&child) = self.exact.get(&key) {
                    return child;
                }
                let child = self.new_node();
                let node = &mut self.nodes[child as usize];
                node.parent = parent;
                node.label_off = key.1;
                node.head = label_head(bytes);
                self.exact.insert(key, child);
                child
            }
            LabelKind::Glob => {
                let mut glob = std::mem::take(&mut self.scratch);
                collapse_stars(bytes, &mut glob);
                let key = (parent, self.intern(&glob), glob.len() as u32);
                self.scratch = glob;
                if let Some(&child) = self.glob_index.get(&key) {
                    return child;
                }
                let child = self.new_node();
                self.glob_index.insert(key, child);
                self.globs.push((key.0, key.1, key.2, child));
                child
            }
        }
    }

    fn compile(mut self, entries: &[(Pattern, RuleId)]) -> Matcher {
        let root = self.new_node();
        let mut all_rules = Vec::new();
        let mut max_rule = None;
        for (pattern, rule) in entries {
            max_rule = max_rule.max(Some(rule.0));
            match pattern.shape() {
                Shape::All => all_rules.push(*rule),
                Shape::Labels { subdomains, labels } => {
                    let mut node = root;
                    for label in labels.iter().rev() {
                        node = self.child(node, label.kind, pattern.label_bytes(label));
                    }
                    let sets = if *subdomains {
                        &mut self.subtree_rules
                    } else {
                        &mut self.terminal_rules
                    };
                    sets.push((node, *rule));
                }
            }
        }

        let mut sets = RuleSets::default();
        let all = sets.intern(&mut all_rules);
        for subtree in [false, true] {
            let list = if subtree {
                &mut self.subtree_rules
            } else {
                &mut self.terminal_rules
            };
            list.sort_unstable();
            let mut rules = Vec::new();
            for group in list.chunk_by(|a, b| a.0 == b.0) {
                rules.clear();
                rules.extend(group.iter().map(|&(_, rule)| rule));
                let set = sets.intern(&mut rules);
                let node = &mut self.nodes[group[0].0 as usize];
                if subtree {
                    node.subtree = set;
                } else {
                    node.terminal = set;
                }
            }
        }

        // Glob edges, grouped by node. Within a node: globs with a star at both ends (tried
        // on every label), then star-first globs sorted by their last byte, then the others
        // sorted by their first byte, so a lookup binary-searches the two sorted runs for
        // the globs that can match its label.
        let bytes = &self.bytes;
        let first = |off: u32| bytes[off as usize];
        let last = |off: u32, len: u32| bytes[(off + len - 1) as usize];
        let class = |off: u32, len: u32| match (first(off) == b'*', last(off, len) == b'*') {
            (true, true) => (0, 0),
            (true, false) => (1, last(off, len)),
            (false, _) => (2, first(off)),
        };
        self.globs
            .sort_by_key(|&(node, off, len, _)| (node, class(off, len)));
        let mut glob_edges = Vec::with_capacity(self.globs.len());
        let mut glob_ranges = Vec::new();
        for group in self.globs.chunk_by(|a, b| a.0 == b.0) {
            self.nodes[group[0].0 as usize].globs = glob_ranges.len() as u32;
            glob_ranges.push(GlobRange {
                start: glob_edges.len() as u32,
                len: group.len() as u32,
                star: group.iter().filter(|g| class(g.1, g.2).0 == 0).count() as u32,
                suffix: group.iter().filter(|g| class(g.1, g.2).0 == 1).count() as u32,
            });
            glob_edges.extend(group.iter().map(|&(_, off, len, child)| GlobEdge {
                off,
                len,
                child,
            }));
        }

        // Exact edges: groups of 12, probed group after group from the hash's home group,
        // sized for 8 edges a group. The group count need not be a power of two: the index
        // comes from a multiply-shift of the hash.
        let group_count = self.exact.len().div_ceil(GROUP_LOAD).max(1);
        let mut groups = vec![EMPTY_GROUP; group_count];
        let mut exact: Vec<_> = self
            .exact
            .iter()
            .map(|(&(p, o, l), &c)| (p, o, l, c))
            .collect();
        exact.sort_unstable();
        for (parent, off, len, child) in exact {
            let label = &self.bytes[off as usize..off as usize + usize::from(len)];
            let hash = edge_hash(parent, label_head(label), label);
            let mut g = slot_index(hash, group_count);
            loop {
                let group = &mut groups[g];
                if let Some(j) = (0..GROUP).find(|&j| group.tag(j) == 0) {
                    group.header |= u128::from(tag(hash)) << (8 * j);
                    group.children[j] = child;
                    break;
                }
                assert!(group.passed() < u32::MAX, "exact-edge table overflow");
                group.header += 1 << 96;
                g = if g + 1 == group_count { 0 } else { g + 1 };
            }
        }

        Matcher {
            nodes: self.nodes.into_boxed_slice(),
            groups: groups.into_boxed_slice(),
            globs: glob_edges.into_boxed_slice(),
            glob_ranges: glob_ranges.into_boxed_slice(),
            bytes: self.bytes.into_boxed_slice(),
            set_ranges: sets.ranges.into_boxed_slice(),
            set_rules: sets.rules.into_boxed_slice(),
            all,
            patterns: entries.len(),
            max_rule,
        }
    }
}

/// Interned, deduplicated rule sets: a set id is an index into `ranges`.
#[derive(Default)]
struct RuleSets {
    ranges: Vec<(u32, u32)>,
    rules: Vec<RuleId>,
    index: FxMap<Vec<RuleId>, u32>,
}

impl RuleSets {
    fn intern(&mut self, rules: &mut Vec<RuleId>) -> u32 {
        if rules.is_empty() {
            return NONE;
        }
        rules.sort_unstable();
        rules.dedup();
        if let Some(&id) = self.index.get(rules.as_slice()) {
            return id;
        }
        let id = self.ranges.len() as u32;
        self.ranges
            .push((self.rules.len() as u32, rules.len() as u32));
        self.rules.extend_from_slice(rules);
        self.index.insert(rules.clone(), id);
        id
    }
}

/// FxHash-style mixing of the parent node and the label: its [`label_head`] `head` (length and
/// first 7 bytes), then the bytes after the 7th, 8 at a time.
#[inline]
fn edge_hash(parent: u32, head: u64, label: &[u8]) -> u64 {
    let mut h = (u64::from(parent).wrapping_mul(HASH_K) ^ head)
        .wrapping_mul(HASH_K)
        .rotate_left(26);
    if label.len() > 7 {
        h = hash_tail(h, &label[7..]);
    }
    h.wrapping_mul(HASH_K)
}

const HASH_K: u64 = 0xf135_7aea_2e62_a9c5;

/// [`edge_hash`] of the bytes after a label's 7th.
#[inline]
fn hash_tail(mut h: u64, tail: &[u8]) -> u64 {
    let mut chunks = tail.chunks_exact(8);
    for chunk in &mut chunks {
        let word = u64::from_le_bytes(chunk.try_into().expect("8-byte chunk"));
        h = (h ^ word).wrapping_mul(HASH_K).rotate_left(26);
    }
    let mut word = 0u64;
    for (k, &b) in chunks.remainder().iter().enumerate() {
        word |= u64::from(b) << (8 * k);
    }
    (h ^ word).wrapping_mul(HASH_K).rotate_left(26)
}

/// Bytes 0..12 set: the tag bytes of a group's header.
const TAG_BYTES: u128 = (1 << 96) - 1;
const LOW7: u128 = 0x7f7f_7f7f_7f7f_7f7f_7f7f_7f7f_7f7f_7f7f;

/// The high bit of each tag byte of `header` equal to `tag` (exact: no false positives).
#[inline]
fn tag_hits(header: u128, tag: u8) -> u128 {
    let x = header ^ (u128::from(tag) * (TAG_BYTES / 0xff));
    !(((x & LOW7).wrapping_add(LOW7)) | x | LOW7) & TAG_BYTES
}

#[inline]
fn slot_index(hash: u64, capacity: usize) -> usize {
    (((hash >> 32) * capacity as u64) >> 32) as usize
}

/// A compiled set of patterns. Immutable; lookups never allocate.
#[derive(Debug, Clone)]
pub struct Matcher {
    nodes: Box<[Node]>,
    groups: Box<[Group]>,
    globs: Box<[GlobEdge]>,
    glob_ranges: Box<[GlobRange]>,
    bytes: Box<[u8]>,
    set_ranges: Box<[(u32, u32)]>,
    set_rules: Box<[RuleId]>,
    /// Rule set of match-all patterns, or `NONE`.
    all: u32,
    patterns: usize,
    max_rule: Option<u32>,
}

impl Default for Matcher {
    fn default() -> Matcher {
        MatcherBuilder::new().build()
    }
}

impl Matcher {
    /// Whether any pattern matches `name`.
    pub fn is_match(&self, name: &Name) -> bool {
        self.walk(name, &mut |_| ControlFlow::Break(())).is_break()
    }

    /// Calls `f` with the rule id of every pattern that matches `name`. An id may be reported
    /// more than once when several of its patterns match.
    pub fn for_each_match(&self, name: &Name, mut f: impl FnMut(RuleId)) {
        let _ = self.walk(name, &mut |set| {
            for &rule in self.set(set) {
                f(rule);
            }
            ControlFlow::Continue(())
        });
    }

    /// Replaces the contents of `out` with the rule ids of the patterns that match `name`.
    /// Allocation-free when `out` came from [`Matcher::rule_set`] (or has seen these ids before).
    pub fn lookup_into(&self, name: &Name, out: &mut RuleSet) {
        out.clear();
        self.for_each_match(name, |rule| {
            out.insert(rule);
        });
    }

    /// The matching rule ids, sorted and deduplicated. Allocates; for tools and tests.
    pub fn matches(&self, name: &Name) -> Vec<RuleId> {
        let mut rules = Vec::new();
        self.for_each_match(name, |rule| rules.push(rule));
        rules.sort_unstable();
        rules.dedup();
        rules
    }

    /// Convenience: whether a name given in text form matches. Invalid names match nothing.
    pub fn is_match_text(&self, name: &str) -> bool {
        Name::from_text(name).is_ok_and(|name| self.is_match(&name))
    }

    /// Convenience: whether an uncompressed wire-format name matches. Invalid names match nothing.
    pub fn is_match_wire(&self, name: &[u8]) -> bool {
        Name::from_wire(name).is_ok_and(|name| self.is_match(&name))
    }

    /// An empty [`RuleSet`] with room for every rule id of this matcher.
    pub fn rule_set(&self) -> RuleSet {
        RuleSet::with_max_rule(self.max_rule.unwrap_or(0))
    }

    /// Number of patterns compiled in.
    pub fn pattern_count(&self) -> usize {
        self.patterns
    }

    /// Number of trie nodes.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Heap bytes held by the compiled automaton.
    pub fn heap_bytes(&self) -> usize {
        use std::mem::size_of_val;
        size_of_val(&*self.nodes)
            + size_of_val(&*self.groups)
            + size_of_val(&*self.globs)
            + size_of_val(&*self.glob_ranges)
            + size_of_val(&*self.bytes)
            + size_of_val(&*self.set_ranges)
            + size_of_val(&*self.set_rules)
    }

    fn set(&self, set: u32) -> &[RuleId] {
        let (start, len) = self.set_ranges[set as usize];
        &self.set_rules[start as usize..(start + len) as usize]
    }

    /// Visits the rule set of every pattern matching `name`, until `f` breaks.
    fn walk(&self, name: &Name, f: &mut impl FnMut(u32) -> ControlFlow<()>) -> ControlFlow<()> {
        if self.all != NONE {
            f(self.all)?;
        }
        if name.is_root() {
            return ControlFlow::Continue(());
        }
        self.walk_from(name, 0, name.label_count(), f)
    }

    /// Visits matches below `node`, which was reached with `remaining` labels of `name` left.
    fn walk_from(
        &self,
        name: &Name,
        node: u32,
        remaining: usize,
        f: &mut impl FnMut(u32) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        let n = &self.nodes[node as usize];
        if remaining == 0 {
            if n.terminal != NONE {
                f(n.terminal)?;
            }
            return ControlFlow::Continue(());
        }
        if n.subtree != NONE {
            f(n.subtree)?;
        }
        let (label, head) = name.label_and_head(remaining - 1);
        if let Some(child) = self.exact_child(node, label, head) {
            self.walk_from(name, child, remaining - 1, f)?;
        }
        if n.any != NONE {
            self.walk_from(name, n.any, remaining - 1, f)?;
        }
        if n.globs == NONE {
            // Most nodes have no glob edges.
            return ControlFlow::Continue(());
        }
        let r = &self.glob_ranges[n.globs as usize];
        let start = r.start as usize;
        let globs = &self.globs[start..start + r.len as usize];
        let (starred, rest) = globs.split_at(r.star as usize);
        let (by_last, by_first) = rest.split_at(r.suffix as usize);
        // Names have no empty labels, so `label` has a first and a last byte.
        let bytes = &self.bytes[..];
        let candidates = starred
            .iter()
            .chain(bucket(by_last, bytes, last_byte, label[label.len() - 1]))
            .chain(bucket(by_first, bytes, first_byte, label[0]));
        for edge in candidates {
            let glob = &self.bytes[edge.off as usize..(edge.off + edge.len) as usize];
            if glob_match(glob, label) {
                self.walk_from(name, edge.child, remaining - 1, f)?;
            }
        }
        ControlFlow::Continue(())
    }

    /// Whether the bytes after the 7th of `n`'s label (whose head matched) are `label`'s.
    #[inline]
    fn tail_eq(&self, n: &Node, label: &[u8]) -> bool {
        self.bytes[n.label_off as usize + 7..][..label.len() - 7] == label[7..]
    }

    /// The child of `parent` through the exact label `label`, whose [`label_head`] is `head`.
    #[inline]
    fn exact_child(&self, parent: u32, label: &[u8], head: u64) -> Option<u32> {
        let hash = edge_hash(parent, head, label);
        let tag = tag(hash);
        let count = self.groups.len();
        let mut g = slot_index(hash, count);
        loop {
            let group = &self.groups[g];
            let mut hits = tag_hits(group.header, tag);
            while hits != 0 {
                let child = group.children[(hits.trailing_zeros() / 8) as usize];
                let n = &self.nodes[child as usize];
                if n.parent == parent
                    && n.head == head
                    && (label.len() <= 7 || self.tail_eq(n, label))
                {
                    return Some(child);
                }
                hits &= hits - 1;
            }
            if group.passed() == 0 {
                return None;
            }
            g = if g + 1 == count { 0 } else { g + 1 };
        }
    }
}

/// The first byte of a glob edge's glob.
fn first_byte(bytes: &[u8], e: &GlobEdge) -> u8 {
    bytes[e.off as usize]
}

/// The last byte of a glob edge's glob.
fn last_byte(bytes: &[u8], e: &GlobEdge) -> u8 {
    bytes[(e.off + e.len - 1) as usize]
}

/// The run of `sorted` (ordered by `key`) whose key is `byte`.
fn bucket<'a>(
    sorted: &'a [GlobEdge],
    bytes: &[u8],
    key: fn(&[u8], &GlobEdge) -> u8,
    byte: u8,
) -> &'a [GlobEdge] {
    let from = sorted.partition_point(|e| key(bytes, e) < byte);
    let to = from + sorted[from..].partition_point(|e| key(bytes, e) == byte);
    &sorted[from..to]
}

/// A reusable set of rule ids: a bitset for membership plus the ids in insertion order.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    bits: Vec<u64>,
    ids: Vec<RuleId>,
}

impl RuleSet {
    /// An empty set that holds ids up to `max_rule` without allocating.
    pub fn with_max_rule(max_rule: u32) -> RuleSet {
        let words = max_rule as usize / 64 + 1;
        RuleSet {
            bits: vec![0; words],
            ids: Vec::with_capacity(words * 64),
        }
    }

    /// Empties the set, keeping its memory.
    pub fn clear(&mut self) {
        for id in self.ids.drain(..) {
            self.bits[id.0 as usize / 64] = 0;
        }
    }

    /// Adds `rule`; returns whether it was new.
    pub fn insert(&mut self, rule: RuleId) -> bool {
        let (word, bit) = (rule.0 as usize / 64, rule.0 % 64);
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        let mask = 1u64 << bit;
        if self.bits[word] & mask != 0 {
            return false;
        }
        self.bits[word] |= mask;
        self.ids.push(rule);
        true
    }

    /// Whether `rule` is in the set.
    pub fn contains(&self, rule: RuleId) -> bool {
        self.bits
            .get(rule.0 as usize / 64)
            .is_some_and(|w| w & (1u64 << (rule.0 % 64)) != 0)
    }

    /// The ids, in the order they were first inserted.
    pub fn as_slice(&self) -> &[RuleId] {
        &self.ids
    }

    /// Number of ids.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_label_head_is_the_trie_label_head() {
        // Short and long labels, and labels at the end of a 255-byte name, where the name's
        // 8-byte window would run past its buffer.
        let long = format!(
            "{}.{}.{}.{}.a.bc",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(56)
        );
        for text in [
            "a",
            "ab.cdefghi.jklmnop.q",
            "Mixed-Case_1.example.com",
            long.as_str(),
        ] {
            let name = Name::from_text(text).unwrap();
            for i in 0..name.label_count() {
                let (label, head) = name.label_and_head(i);
                assert_eq!(label, name.label(i));
                assert_eq!(head, label_head(label), "{text} label {i}");
            }
        }
        assert_eq!(Name::from_text(&long).unwrap().wire().len(), 255);
    }

    #[test]
    fn tag_hits_are_exact() {
        let mut header = u128::from(7u32) << 96; // passed = 7: never taken for a tag
        for (j, t) in [0u8, 1, 0x80, 0xff, 0x7f, 1, 2, 0, 0x81, 1, 0xfe, 1]
            .into_iter()
            .enumerate()
        {
            header |= u128::from(t) << (8 * j);
        }
        let group = Group {
            header,
            children: [NONE; GROUP],
        };
        for tag in 0..=255u8 {
            let mut hits = tag_hits(header, tag);
            for j in 0..GROUP {
                assert_eq!(hits & 0x80 != 0, group.tag(j) == tag, "tag {tag} byte {j}");
                hits >>= 8;
            }
            assert_eq!(hits, 0);
        }
    }

    #[test]
    fn groups_overflow_and_are_found() {
        // Many children of one parent and of many parents: some groups overflow into the next
        // ones, and every edge is still found; absent labels are not.
        let mut b = MatcherBuilder::new();
        for i in 0..5000 {
            b.add(
                Pattern::parse(&format!("h{i}.d{}.com", i % 7)).unwrap(),
                RuleId(i),
            );
        }
        let m = b.build();
        assert!(
            m.groups.iter().any(|g| g.passed() > 0),
            "no group overflowed"
        );
        for i in 0..5000 {
            assert!(m.is_match_text(&format!("h{i}.d{}.com", i % 7)));
            assert!(!m.is_match_text(&format!("h{i}.d{}.com", (i + 1) % 7)));
            assert!(!m.is_match_text(&format!("h{}.d{}.com", i + 5000, i % 7)));
        }
    }
}
