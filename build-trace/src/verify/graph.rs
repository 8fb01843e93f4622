//! The unresolved derivation graph the verifier walks: loaded from `.drv` files in a store
//! directory, or from `nix show-derivation -r` JSON, and walked dependencies first.
//! Not here: whether a derivation matches its path or can be accepted (the verifier checks).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::OnceLock;

use nix_formats::derivation::Derivation;
use nix_formats::StorePath;

use super::VerifyError;

/// Derivations by drv path.
#[derive(Debug, Clone, Default)]
pub struct DrvSet {
    drvs: BTreeMap<StorePath, Derivation>,
    /// Each derivation's height (see [`DrvSet::heights`]), made on first use; `None` when the
    /// graph has a cycle.
    heights: OnceLock<Option<HashMap<StorePath, u32>>>,
}

impl DrvSet {
    /// An empty set.
    pub fn new() -> DrvSet {
        DrvSet::default()
    }

    /// Read `target` and, transitively, every input derivation from `dir` (a directory holding
    /// `.drv` files by base name: `/nix/store`, or `<chroot>/nix/store`).
    pub fn from_store_dir(dir: &Path, target: &StorePath) -> Result<DrvSet, VerifyError> {
        let mut set = DrvSet::new();
        let mut todo = vec![target.clone()];
        while let Some(p) = todo.pop() {
            if set.drvs.contains_key(&p) {
                continue;
            }
            let drv = read_drv_file(dir, &p)?.ok_or_else(|| VerifyError::Read {
                path: dir.join(p.base_name()).display().to_string(),
                source: std::io::ErrorKind::NotFound.into(),
            })?;
            todo.extend(drv.input_drvs.keys().filter(|d| !set.drvs.contains_key(*d)).cloned());
            set.drvs.insert(p, drv);
        }
        Ok(set)
    }

    /// Parse `nix show-derivation -r` JSON (Nix 2.8's shape).
    pub fn from_show_derivation(json: &str) -> Result<DrvSet, VerifyError> {
        let drvs =
            nix_formats::derivation::json::parse_show_derivation(json).map_err(|source| {
                VerifyError::Derivation { drv: "show-derivation JSON".into(), source }
            })?;
        Ok(DrvSet { drvs, heights: OnceLock::new() })
    }

    /// Add a derivation.
    pub fn insert(&mut self, path: StorePath, drv: Derivation) {
        self.drvs.insert(path, drv);
        self.heights = OnceLock::new();
    }

    /// A derivation by path.
    pub fn get(&self, path: &StorePath) -> Option<&Derivation> {
        self.drvs.get(path)
    }

    /// All derivations.
    pub fn iter(&self) -> impl Iterator<Item = (&StorePath, &Derivation)> {
        self.drvs.iter()
    }

    /// How many derivations.
    pub fn len(&self) -> usize {
        self.drvs.len()
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.drvs.is_empty()
    }

    /// Every input derivation `udrv` depends on, transitively: whose accepted facts its input
    /// closure may link to. Found on demand (see [`Dependencies`]).
    pub(crate) fn dependencies(&self, udrv: &StorePath) -> Dependencies<'_> {
        let first: Vec<&StorePath> =
            self.drvs.get(udrv).map(|d| d.input_drvs.keys().collect()).unwrap_or_default();
        let walk =
            Walk { found: first.iter().copied().collect(), todo: first.into(), ..Walk::default() };
        Dependencies { drvs: self, heights: self.heights(), walk: RefCell::new(walk) }
    }

    /// Each derivation's height: 0 without input derivations in the set, else one more than
    /// its highest input's. A derivation's dependencies are all lower than it. `None` when the
    /// graph has a cycle (the walk refuses it elsewhere).
    fn heights(&self) -> Option<&HashMap<StorePath, u32>> {
        self.heights
            .get_or_init(|| {
                let mut heights: HashMap<&StorePath, u32> = HashMap::with_capacity(self.len());
                // (node, whether its inputs are done), depth first; a node met again while
                // on the stack is a cycle.
                let mut on_stack: HashSet<&StorePath> = HashSet::new();
                for root in self.drvs.keys() {
                    let mut stack = vec![(root, false)];
                    while let Some((node, inputs_done)) = stack.pop() {
                        if heights.contains_key(node) {
                            continue;
                        }
                        let inputs = self.drvs[node].input_drvs.keys();
                        if inputs_done {
                            let h = inputs.filter_map(|i| heights.get(i)).map(|h| h + 1).max();
                            heights.insert(node, h.unwrap_or(0));
                            on_stack.remove(node);
                            continue;
                        }
                        if !on_stack.insert(node) {
                            return None;
                        }
                        stack.push((node, true));
                        for i in inputs.filter(|i| self.drvs.contains_key(*i)) {
                            if on_stack.contains(i) {
                                return None;
                            }
                            if !heights.contains_key(i) {
                                stack.push((i, false));
                            }
                        }
                    }
                }
                Some(heights.into_iter().map(|(k, v)| (k.clone(), v)).collect())
            })
            .as_ref()
    }

    /// The derivations `target` depends on, dependencies first, ending with `target`
    /// (iterative; a missing input or a cycle is an error).
    pub fn post_order(&self, target: &StorePath) -> Result<Vec<StorePath>, VerifyError> {
        let mut order = Vec::new();
        let mut done: BTreeSet<&StorePath> = BTreeSet::new();
        let mut on_stack: BTreeSet<&StorePath> = BTreeSet::new();
        let target =
            self.drvs.get_key_value(target).map(|(k, _)| k).ok_or_else(|| {
                VerifyError::MissingDrv { drv: target.to_string(), needed_by: None }
            })?;
        // (node, index of the next input to visit)
        let mut stack: Vec<(&StorePath, usize)> = vec![(target, 0)];
        on_stack.insert(target);
        while let Some((node, i)) = stack.pop() {
            let drv = &self.drvs[node];
            if let Some(input) = drv.input_drvs.keys().nth(i) {
                stack.push((node, i + 1));
                if done.contains(input) {
                    continue;
                }
                if on_stack.contains(input) {
                    return Err(VerifyError::Cycle(input.to_string()));
                }
                let input = self.drvs.get_key_value(input).map(|(k, _)| k).ok_or_else(|| {
                    VerifyError::MissingDrv {
                        drv: input.to_string(),
                        needed_by: Some(node.to_string()),
                    }
                })?;
                on_stack.insert(input);
                stack.push((input, 0));
            } else {
                on_stack.remove(node);
                done.insert(node);
                order.push(node.clone());
            }
        }
        Ok(order)
    }
}

/// The transitive input derivations of one derivation, found on demand: a breadth-first walk
/// through input derivations, taken only as far as the questions asked need. A step's input
/// closure names outputs of nearby dependencies, so most questions are answered within a few
/// levels, not by the whole graph below the step (which made a chain of n steps cost n² / 2).
/// Whether `p` is a dependency needs only derivations higher than `p` ([`DrvSet::heights`])
/// expanded, since every path down to `p` passes through higher ones only: lower ones are set
/// aside, and taken up again by a later question about a lower derivation. The answers are
/// those of the whole set.
#[derive(Debug)]
pub(crate) struct Dependencies<'a> {
    drvs: &'a DrvSet,
    heights: Option<&'a HashMap<StorePath, u32>>,
    walk: RefCell<Walk<'a>>,
}

/// Where a [`Dependencies`] walk stands.
#[derive(Debug, Default)]
struct Walk<'a> {
    /// Derivations found so far (all dependencies).
    found: HashSet<&'a StorePath>,
    /// Found, inputs not yet listed, in the order found.
    todo: VecDeque<&'a StorePath>,
    /// Found, inputs not yet listed, set aside as too low for the question asked then.
    aside: BinaryHeap<Below<'a>>,
}

/// A derivation set aside, ordered by height alone.
#[derive(Debug)]
struct Below<'a>(u32, &'a StorePath);

impl PartialEq for Below<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl Eq for Below<'_> {}

impl Ord for Below<'_> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}

impl PartialOrd for Below<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Dependencies<'_> {
    fn height(&self, p: &StorePath) -> Option<u32> {
        self.heights.and_then(|h| h.get(p)).copied()
    }

    /// Whether `p` is one of them.
    pub(crate) fn contains(&self, p: &StorePath) -> bool {
        let mut walk = self.walk.borrow_mut();
        let Walk { found, todo, aside } = &mut *walk;
        if found.contains(p) {
            return true;
        }
        // Nothing at or below `p`'s height leads to `p`; without a height, anything may.
        let floor = self.height(p);
        let above = |h: u32| floor.is_none_or(|f| h > f);
        while aside.peek().is_some_and(|b| above(b.0)) {
            todo.extend(aside.pop().map(|b| b.1));
        }
        while let Some(next) = todo.pop_front() {
            let h = self.height(next).unwrap_or(0);
            if !above(h) {
                aside.push(Below(h, next));
                continue;
            }
            let Some(d) = self.drvs.drvs.get(next) else { continue };
            for i in d.input_drvs.keys() {
                if found.insert(i) {
                    todo.push_back(i);
                }
            }
            if found.contains(p) {
                return true;
            }
        }
        false
    }
}

/// The `.drv` `p` in `dir` (a file by base name), `None` if there is no such file.
pub(crate) fn read_drv_file(dir: &Path, p: &StorePath) -> Result<Option<Derivation>, VerifyError> {
    let file = dir.join(p.base_name());
    let bytes = match std::fs::read(&file) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(VerifyError::Read { path: file.display().to_string(), source }),
    };
    Derivation::from_aterm(&bytes)
        .map(Some)
        .map_err(|source| VerifyError::Derivation { drv: p.to_string(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(i: usize) -> StorePath {
        StorePath::parse(&format!("/nix/store/{:0>32}-d{i}.drv", i % 10_000_000)).unwrap()
    }

    /// A random DAG of `n` derivations (inputs only to lower numbers), some inputs missing.
    fn dag(n: usize, seed: u64) -> DrvSet {
        let mut x = seed;
        let mut next = move || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) as usize
        };
        let mut set = DrvSet::new();
        for i in 0..n {
            let mut d = Derivation::default();
            for _ in 0..(next() % 4) {
                if i > 0 {
                    let j = i - 1 - next() % i.min(12);
                    d.input_drvs.insert(path(j), BTreeSet::from(["out".to_owned()]));
                }
            }
            if next() % 10 == 0 {
                d.input_drvs.insert(path(1_000_000 + i), BTreeSet::new()); // not in the set
            }
            set.insert(path(i), d);
        }
        set
    }

    /// The whole set of `u`'s dependencies, the plain way.
    fn closure(set: &DrvSet, u: &StorePath) -> BTreeSet<StorePath> {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<StorePath> = set.get(u).unwrap().input_drvs.keys().cloned().collect();
        while let Some(p) = todo.pop() {
            if seen.insert(p.clone()) {
                if let Some(d) = set.get(&p) {
                    todo.extend(d.input_drvs.keys().cloned());
                }
            }
        }
        seen
    }

    #[test]
    fn dependencies_found_on_demand_are_the_whole_set() {
        for seed in 0..4 {
            let n = 120;
            let set = dag(n, seed);
            assert!(set.heights().is_some());
            for u in (0..n).map(path) {
                let all = closure(&set, &u);
                let deps = set.dependencies(&u);
                // Ask in an order that goes up and down, so the walk resumes in both directions.
                let mut asked: Vec<StorePath> = (0..n).map(path).collect();
                asked.extend((0..20).map(|i| path(1_000_000 + i)));
                asked
                    .sort_by_key(|p| p.to_string().len() ^ (p.hash_part().as_bytes()[31] as usize));
                for v in &asked {
                    assert_eq!(deps.contains(v), all.contains(v), "{u} depends on {v}?");
                }
            }
        }
    }

    #[test]
    fn a_cycle_has_no_heights_and_dependencies_still_answer() {
        let mut set = dag(10, 7);
        let mut d = Derivation::default();
        d.input_drvs.insert(path(11), BTreeSet::new());
        set.insert(path(10), d.clone());
        let mut back = Derivation::default();
        back.input_drvs.insert(path(10), BTreeSet::new());
        back.input_drvs.insert(path(3), BTreeSet::new());
        set.insert(path(11), back);
        assert!(set.heights().is_none());
        let deps = set.dependencies(&path(10));
        assert!(deps.contains(&path(11)) && deps.contains(&path(3)) && !deps.contains(&path(12)));
    }
}
