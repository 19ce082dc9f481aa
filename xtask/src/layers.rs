//! `cargo xtask layers` (issue 29): lb-userspace's modules as layers with arrows only downwards.
//!
//! The graph's unit is the top-level module (`src/foo.rs` and `src/foo/**.rs` are `foo`); an
//! arrow `a -> b` is any reference of a file of `a` to `crate::b` (or `super::b` from the top
//! level), read with syn outside `#[cfg(test)]`. It began as a ratchet over a tree with a circle
//! of 28 modules: `KNOWN_UPWARD` and `KNOWN_LONG` named the offenders, a new one failed, and so
//! did one that had gone (the lists only shrank). Both are empty now; they stay, for a change
//! that must land in steps.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::Path,
};

use anyhow::{bail, Context as _, Result};
use proc_macro2::{Delimiter, Spacing, Span, TokenStream, TokenTree};
use syn::visit::{self, Visit};

/// The layers, bottom first: a module may use its own layer and the ones below.
const LAYERS: &[(&str, &[&str])] = &[
    ("base", &["error", "key", "tls", "listen", "maglev", "shares", "history", "journal"]),
    ("config", &["config", "cfgfile", "webconfig", "openfiles"]),
    ("domain", &["guard", "alerts", "status"]),
    ("datapath", &["conns", "tables", "flowtab", "datapath", "stats", "neigh", "gc"]),
    ("reconcile", &["reconcile", "explain", "events", "wire"]),
    ("daemon", &["daemon", "health", "sinks"]),
    ("node", &["node", "announce", "peers", "limits", "api", "metrics", "statuspage"]),
    ("cli", &["cli", "client"]),
];

/// Arrows upwards still to cut (`cargo xtask layers --arrows` lists the lines that make each).
/// A circle across layers climbs back to where it started, so it has one: a new circle fails as
/// a new arrow upwards. A circle inside one layer climbs nowhere; `check` fails on it apart.
/// Empty since issue 29 cut the last ones: the crate has no circle, and none may come back.
const KNOWN_UPWARD: &[(&str, &str)] = &[];

/// Files over `MAX_LINES` still to split (relative to lb-userspace/src). Empty since issue 29
/// split the last ones.
const KNOWN_LONG: &[&str] = &[];

const MAX_LINES: usize = 500;

/// Runs the check on lb-userspace/src; with `arrows`, lists every upward arrow and its lines.
pub fn run(arrows: bool) -> Result<()> {
    let src = crate::workspace_root().join("lb-userspace/src");
    let files = read_sources(&src)?;
    let (graph, lengths) = build_graph(&files)?;
    let verdict = check(LAYERS, KNOWN_UPWARD, &graph);
    let (long_problems, long_known) = check_lengths(&lengths, KNOWN_LONG);
    if arrows {
        for (a, b, sites) in upward_arrows(LAYERS, &graph) {
            println!("{a} -> {b}: {}", sites_text(sites));
        }
    }
    for circle in &verdict.circles {
        println!("layers: circle ({} modules): {}", circle.len(), circle.join(", "));
    }
    let problems: Vec<_> = verdict.problems.iter().chain(&long_problems).collect();
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("layers: {p}");
        }
        bail!("layers: {} problems in lb-userspace's module graph (above)", problems.len());
    }
    println!(
        "layers: {} modules in {} layers, 0 new upward arrows ({} known, issue 29), no file over {MAX_LINES} lines but {long_known} known",
        graph.modules.len(),
        LAYERS.len(),
        verdict.known,
    );
    Ok(())
}

/// Every `.rs` file under `dir`, as (path relative to `dir` with `/`, text), sorted.
fn read_sources(dir: &Path) -> Result<Vec<(String, String)>> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(dir).expect("under dir").components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
                let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                files.push((rel, text));
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Where an arrow is written: file (relative to lb-userspace/src) and line.
type Site = (String, usize);

#[derive(Default)]
struct Graph {
    modules: BTreeSet<String>,
    arrows: BTreeMap<(String, String), Vec<Site>>,
}

/// The module path of a file: `daemon/state.rs` is `daemon::state`, `daemon/mod.rs` is `daemon`.
fn module_path(rel: &str) -> Vec<String> {
    let mut path: Vec<String> = rel.trim_end_matches(".rs").split('/').map(str::to_owned).collect();
    if path.len() > 1 && path.last().is_some_and(|l| l == "mod") {
        path.pop();
    }
    path
}

/// The graph of `files` (relative path, text), and every file's length in lines as `wc -l`
/// counts them (newlines).
fn build_graph(files: &[(String, String)]) -> Result<(Graph, BTreeMap<String, usize>)> {
    let lengths = files.iter().map(|(rel, text)| (rel.clone(), text.bytes().filter(|&b| b == b'\n').count())).collect();
    let mut parsed = Vec::new();
    let mut lib = None;
    for (rel, text) in files {
        // main.rs is the binary's (it says `lb_userspace::`); lib.rs only tells re-exports.
        if rel == "main.rs" {
            continue;
        }
        let file = syn::parse_file(text).with_context(|| format!("parsing lb-userspace/src/{rel}"))?;
        if rel == "lib.rs" {
            lib = Some(file);
        } else {
            parsed.push((rel, module_path(rel), file));
        }
    }
    let mut graph = Graph { modules: parsed.iter().map(|(_, path, _)| path[0].clone()).collect(), ..Graph::default() };

    // What a name at the crate's root stands for: a module, something lib.rs imports from one
    // (`crate::Error` is `error`'s), or a `#[macro_export]` macro (`outln!` is `cli`'s).
    let mut roots: HashMap<String, String> = graph.modules.iter().map(|m| (m.clone(), m.clone())).collect();
    if let Some(lib) = &lib {
        for item in &lib.items {
            if let syn::Item::Use(u) = item {
                if !is_test(&u.attrs) {
                    root_imports(&u.tree, &mut Vec::new(), &graph.modules, &mut roots);
                }
            }
        }
    }
    let mut macros = HashMap::new();
    for (_, path, file) in &parsed {
        exported_macros(&file.items, &path[0], &mut macros);
    }
    roots.extend(macros.iter().map(|(k, v)| (k.clone(), v.clone())));

    for (rel, path, file) in &parsed {
        let mut refs = Refs { modpath: path.clone(), found: Vec::new() };
        refs.visit_file(file);
        for r in refs.found {
            let target = match &r.name {
                Name::Root(n) => roots.get(n),
                Name::Macro(n) => macros.get(n),
            };
            if let Some(target) = target.filter(|t| **t != path[0]) {
                graph.arrows.entry((path[0].clone(), target.clone())).or_default().push(((*rel).clone(), r.line));
            }
        }
    }
    // A grouped `use` names one line once per item.
    for sites in graph.arrows.values_mut() {
        sites.sort();
        sites.dedup();
    }
    Ok((graph, lengths))
}

/// The names a `use` in lib.rs brings to the crate's root from a module.
fn root_imports(tree: &syn::UseTree, prefix: &mut Vec<String>, modules: &BTreeSet<String>, roots: &mut HashMap<String, String>) {
    let mut leaf = |name: &syn::Ident, prefix: &[String]| {
        let from = prefix.iter().find(|s| *s != "crate" && *s != "self");
        if let Some(m) = from.filter(|m| modules.contains(*m)) {
            roots.insert(name.to_string(), m.clone());
        }
    };
    match tree {
        syn::UseTree::Path(p) => {
            prefix.push(p.ident.to_string());
            root_imports(&p.tree, prefix, modules, roots);
            prefix.pop();
        }
        syn::UseTree::Name(n) => leaf(&n.ident, prefix),
        syn::UseTree::Rename(r) => leaf(&r.rename, prefix),
        syn::UseTree::Group(g) => g.items.iter().for_each(|t| root_imports(t, prefix, modules, roots)),
        // A glob's names are unknown without resolving it; lib.rs has none.
        syn::UseTree::Glob(_) => {}
    }
}

/// `#[macro_export]` macros live at the crate's root whichever module defines them.
fn exported_macros(items: &[syn::Item], module: &str, macros: &mut HashMap<String, String>) {
    for item in items {
        match item {
            syn::Item::Macro(m) if !is_test(&m.attrs) && m.attrs.iter().any(|a| a.path().is_ident("macro_export")) => {
                if let Some(name) = &m.ident {
                    macros.insert(name.to_string(), module.to_owned());
                }
            }
            syn::Item::Mod(m) if !is_test(&m.attrs) => {
                if let Some((_, items)) = &m.content {
                    exported_macros(items, module, macros);
                }
            }
            _ => {}
        }
    }
}

/// Whether the attributes make an item test-only: `#[cfg(test)]` or `#[cfg(all(test, …))]`.
fn is_test(attrs: &[syn::Attribute]) -> bool {
    fn test_only(meta: &syn::Meta) -> bool {
        match meta {
            syn::Meta::Path(p) => p.is_ident("test"),
            syn::Meta::List(l) if l.path.is_ident("all") => {
                l.parse_args_with(syn::punctuated::Punctuated::<syn::Meta, syn::Token![,]>::parse_terminated).is_ok_and(|args| args.iter().any(test_only))
            }
            _ => false,
        }
    }
    attrs.iter().any(|a| a.path().is_ident("cfg") && a.parse_args::<syn::Meta>().is_ok_and(|m| test_only(&m)))
}

fn item_attrs(item: &syn::Item) -> &[syn::Attribute] {
    use syn::Item;
    match item {
        Item::Const(i) => &i.attrs,
        Item::Enum(i) => &i.attrs,
        Item::ExternCrate(i) => &i.attrs,
        Item::Fn(i) => &i.attrs,
        Item::ForeignMod(i) => &i.attrs,
        Item::Impl(i) => &i.attrs,
        Item::Macro(i) => &i.attrs,
        Item::Mod(i) => &i.attrs,
        Item::Static(i) => &i.attrs,
        Item::Struct(i) => &i.attrs,
        Item::Trait(i) => &i.attrs,
        Item::TraitAlias(i) => &i.attrs,
        Item::Type(i) => &i.attrs,
        Item::Union(i) => &i.attrs,
        Item::Use(i) => &i.attrs,
        _ => &[],
    }
}

/// A name at the crate's root a file refers to.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Name {
    /// `crate::name…`, or `super::name…` from a top-level module.
    Root(String),
    /// `name!(…)`: a `#[macro_export]` macro if there is one by that name.
    Macro(String),
}

struct Ref {
    name: Name,
    line: usize,
}

/// Collects the crate-root names a file refers to, seen from module `modpath`.
struct Refs {
    modpath: Vec<String>,
    found: Vec<Ref>,
}

impl Refs {
    /// Records `segs` if it leaves the top-level module: `crate::x…`, or as many `super`s as
    /// the module is deep. A `super` that stays inside (`daemon/state.rs`'s `super::cluster`)
    /// and every other path (std, other crates, local names) are no arrow.
    fn path(&mut self, segs: &[String], span: Span) {
        let name = match segs.first().map(String::as_str) {
            Some("crate") => segs.get(1),
            Some("super") => {
                let ups = segs.iter().take_while(|s| *s == "super").count();
                segs.get(ups).filter(|_| ups == self.modpath.len())
            }
            _ => None,
        };
        if let Some(name) = name {
            self.found.push(Ref { name: Name::Root(name.clone()), line: span.start().line });
        }
    }

    fn use_tree(&mut self, tree: &syn::UseTree, prefix: &mut Vec<String>) {
        let mut leaf = |this: &mut Self, name: String, span: Span| {
            prefix.push(name);
            this.path(prefix, span);
            prefix.pop();
        };
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(&p.tree, prefix);
                prefix.pop();
            }
            syn::UseTree::Name(n) => leaf(self, n.ident.to_string(), n.ident.span()),
            syn::UseTree::Rename(r) => leaf(self, r.ident.to_string(), r.ident.span()),
            syn::UseTree::Glob(g) => leaf(self, "*".into(), g.star_token.span),
            syn::UseTree::Group(g) => g.items.iter().for_each(|t| self.use_tree(t, prefix)),
        }
    }

    /// Token streams syn leaves unparsed (macro arguments and bodies, attribute arguments):
    /// `crate::x` / `$crate::x` / `super::x` sequences, and `name!(…)` calls.
    fn tokens(&mut self, tokens: TokenStream) {
        let tts: Vec<TokenTree> = tokens.into_iter().collect();
        let ident = |i: usize| match tts.get(i) {
            Some(TokenTree::Ident(id)) => Some(id.to_string()),
            _ => None,
        };
        let colons = |i: usize| matches!((tts.get(i), tts.get(i + 1)), (Some(TokenTree::Punct(a)), Some(TokenTree::Punct(b))) if a.as_char() == ':' && a.spacing() == Spacing::Joint && b.as_char() == ':');
        for (i, tt) in tts.iter().enumerate() {
            match tt {
                TokenTree::Group(g) => self.tokens(g.stream()),
                TokenTree::Ident(id) if id == "crate" || id == "super" => {
                    // Not the tail of a path (`a::super` is not valid, `x::crate` neither).
                    if i >= 2 && colons(i - 2) {
                        continue;
                    }
                    let mut segs = vec![id.to_string()];
                    let mut j = i + 1;
                    while colons(j) {
                        let Some(next) = ident(j + 2) else { break };
                        segs.push(next);
                        j += 3;
                    }
                    self.path(&segs, id.span());
                }
                TokenTree::Ident(id) => {
                    let call = matches!(tts.get(i + 1), Some(TokenTree::Punct(p)) if p.as_char() == '!' && p.spacing() == Spacing::Alone)
                        && matches!(tts.get(i + 2), Some(TokenTree::Group(g)) if g.delimiter() != Delimiter::None);
                    if call {
                        self.found.push(Ref { name: Name::Macro(id.to_string()), line: id.span().start().line });
                    }
                }
                _ => {}
            }
        }
    }
}

impl<'ast> Visit<'ast> for Refs {
    fn visit_item(&mut self, i: &'ast syn::Item) {
        if is_test(item_attrs(i)) {
            return;
        }
        if let syn::Item::Mod(m) = i {
            // An inline module is one `super` deeper; an out-of-line one is its own file.
            self.modpath.push(m.ident.to_string());
            visit::visit_item(self, i);
            self.modpath.pop();
        } else {
            visit::visit_item(self, i);
        }
    }

    fn visit_item_use(&mut self, i: &'ast syn::ItemUse) {
        self.use_tree(&i.tree, &mut Vec::new());
    }

    fn visit_path(&mut self, i: &'ast syn::Path) {
        let segs: Vec<String> = i.segments.iter().map(|s| s.ident.to_string()).collect();
        if let Some(first) = i.segments.first() {
            self.path(&segs, first.ident.span());
        }
        visit::visit_path(self, i);
    }

    // `pub(super)`, `pub(in crate::a)`: only ever an ancestor, no arrow.
    fn visit_visibility(&mut self, _: &'ast syn::Visibility) {}

    fn visit_macro(&mut self, i: &'ast syn::Macro) {
        if let Some(name) = i.path.get_ident() {
            self.found.push(Ref { name: Name::Macro(name.to_string()), line: name.span().start().line });
        }
        self.tokens(i.tokens.clone());
        visit::visit_macro(self, i);
    }

    fn visit_attribute(&mut self, i: &'ast syn::Attribute) {
        if let syn::Meta::List(list) = &i.meta {
            self.tokens(list.tokens.clone());
            // serde names functions and types in strings: `deserialize_with = "crate::config::duration"`.
            if list.path.is_ident("serde") {
                self.serde_strings(list.tokens.clone());
            }
        }
        visit::visit_attribute(self, i);
    }

    fn visit_impl_item(&mut self, i: &'ast syn::ImplItem) {
        let attrs = match i {
            syn::ImplItem::Const(i) => &i.attrs,
            syn::ImplItem::Fn(i) => &i.attrs,
            syn::ImplItem::Type(i) => &i.attrs,
            syn::ImplItem::Macro(i) => &i.attrs,
            _ => &Vec::new(),
        };
        if !is_test(attrs) {
            visit::visit_impl_item(self, i);
        }
    }

    fn visit_trait_item(&mut self, i: &'ast syn::TraitItem) {
        let attrs = match i {
            syn::TraitItem::Const(i) => &i.attrs,
            syn::TraitItem::Fn(i) => &i.attrs,
            syn::TraitItem::Type(i) => &i.attrs,
            syn::TraitItem::Macro(i) => &i.attrs,
            _ => &Vec::new(),
        };
        if !is_test(attrs) {
            visit::visit_trait_item(self, i);
        }
    }

    fn visit_field(&mut self, i: &'ast syn::Field) {
        if !is_test(&i.attrs) {
            visit::visit_field(self, i);
        }
    }

    fn visit_variant(&mut self, i: &'ast syn::Variant) {
        if !is_test(&i.attrs) {
            visit::visit_variant(self, i);
        }
    }

    fn visit_arm(&mut self, i: &'ast syn::Arm) {
        if !is_test(&i.attrs) {
            visit::visit_arm(self, i);
        }
    }

    fn visit_local(&mut self, i: &'ast syn::Local) {
        if !is_test(&i.attrs) {
            visit::visit_local(self, i);
        }
    }

    fn visit_stmt_macro(&mut self, i: &'ast syn::StmtMacro) {
        if !is_test(&i.attrs) {
            visit::visit_stmt_macro(self, i);
        }
    }
}

impl Refs {
    fn serde_strings(&mut self, tokens: TokenStream) {
        for tt in tokens {
            match tt {
                TokenTree::Group(g) => self.serde_strings(g.stream()),
                TokenTree::Literal(lit) => {
                    let span = lit.span();
                    if let Ok(ty) = syn::parse2::<syn::LitStr>(TokenTree::Literal(lit).into()).and_then(|s| s.parse::<syn::Type>()) {
                        // The string's own spans all point at its first line.
                        let before = self.found.len();
                        self.visit_type(&ty);
                        for r in &mut self.found[before..] {
                            r.line = span.start().line;
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

/// What `check` found: problems that fail the build, circles (information), known arrows still
/// there.
struct Verdict {
    problems: Vec<String>,
    circles: Vec<Vec<String>>,
    known: usize,
}

fn layer_index<'a>(layers: &'a [(&'a str, &'a [&'a str])]) -> HashMap<&'a str, usize> {
    layers.iter().enumerate().flat_map(|(i, (_, mods))| mods.iter().map(move |m| (*m, i))).collect()
}

/// The arrows to a higher layer, with where they are written.
fn upward_arrows<'g>(layers: &[(&str, &[&str])], graph: &'g Graph) -> Vec<(&'g str, &'g str, &'g [Site])> {
    let layer = layer_index(layers);
    graph
        .arrows
        .iter()
        .filter(|((a, b), _)| matches!((layer.get(a.as_str()), layer.get(b.as_str())), (Some(la), Some(lb)) if lb > la))
        .map(|((a, b), sites)| (a.as_str(), b.as_str(), sites.as_slice()))
        .collect()
}

fn sites_text(sites: &[Site]) -> String {
    sites.iter().map(|(f, l)| format!("lb-userspace/src/{f}:{l}")).collect::<Vec<_>>().join(", ")
}

fn check(layers: &[(&str, &[&str])], known: &[(&str, &str)], graph: &Graph) -> Verdict {
    const FILE: &str = "xtask/src/layers.rs";
    let mut problems = Vec::new();
    let layer = layer_index(layers);
    let mut listed = BTreeSet::new();
    for m in layers.iter().flat_map(|(_, mods)| mods.iter()) {
        if !listed.insert(*m) {
            problems.push(format!("module {m} is in two layers: keep it in one in LAYERS in {FILE}"));
        }
        if !graph.modules.contains(*m) {
            problems.push(format!("module {m} is in LAYERS but not in lb-userspace/src: remove it from LAYERS in {FILE}"));
        }
    }
    for m in &graph.modules {
        if !layer.contains_key(m.as_str()) {
            problems.push(format!("module {m} is in no layer: add it to LAYERS in {FILE}"));
        }
    }

    let mut known_set = BTreeSet::new();
    for k in known {
        if !known_set.insert(*k) {
            problems.push(format!("{} -> {} is twice in KNOWN_UPWARD: remove one in {FILE}", k.0, k.1));
        }
    }
    let mut known_count = 0;
    for (a, b, sites) in upward_arrows(layers, graph) {
        if known_set.contains(&(a, b)) {
            known_count += 1;
        } else {
            let (la, lb) = (layers[layer[a]].0, layers[layer[b]].0);
            problems.push(format!("new arrow upwards: {a} (layer {la}) -> {b} (layer {lb}), in {}: move the type down or invert the dependency", sites_text(sites)));
        }
    }
    for (a, b) in known {
        let exists = graph.arrows.contains_key(&((*a).to_owned(), (*b).to_owned()));
        match (layer.get(a), layer.get(b)) {
            _ if !exists => problems.push(format!("{a} -> {b} is gone: remove it from KNOWN_UPWARD in {FILE}")),
            (Some(la), Some(lb)) if lb <= la => problems.push(format!("{a} -> {b} no longer goes upwards in LAYERS: remove it from KNOWN_UPWARD in {FILE}")),
            _ => {}
        }
    }

    let all: Vec<_> = graph.arrows.keys().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let circles = circles(&graph.modules, &all);
    // The upward rule misses a circle inside one layer (no arrow of it climbs): those fail here.
    let flat: Vec<_> = all.iter().copied().filter(|(a, b)| layer.get(a).is_some_and(|la| layer.get(b) == Some(la))).collect();
    for c in self::circles(&graph.modules, &flat) {
        let name = layers[layer[c[0].as_str()]].0;
        problems.push(format!("circle inside layer {name} ({} modules): {}: cut one of its arrows", c.len(), c.join(", ")));
    }
    Verdict { problems, circles, known: known_count }
}

/// The strongly connected components of more than one module (Tarjan's algorithm), each sorted,
/// in order of their first module.
fn circles(modules: &BTreeSet<String>, arrows: &[(&str, &str)]) -> Vec<Vec<String>> {
    struct Tarjan<'a> {
        next: Vec<Vec<usize>>,
        names: Vec<&'a str>,
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on_stack: Vec<bool>,
        stack: Vec<usize>,
        counter: usize,
        found: Vec<Vec<String>>,
    }
    impl Tarjan<'_> {
        fn visit(&mut self, v: usize) {
            self.index[v] = Some(self.counter);
            self.low[v] = self.counter;
            self.counter += 1;
            self.stack.push(v);
            self.on_stack[v] = true;
            for w in self.next[v].clone() {
                match self.index[w] {
                    None => {
                        self.visit(w);
                        self.low[v] = self.low[v].min(self.low[w]);
                    }
                    Some(iw) if self.on_stack[w] => self.low[v] = self.low[v].min(iw),
                    Some(_) => {}
                }
            }
            if Some(self.low[v]) == self.index[v] {
                let mut scc = Vec::new();
                loop {
                    let w = self.stack.pop().expect("v is on the stack");
                    self.on_stack[w] = false;
                    scc.push(self.names[w].to_owned());
                    if w == v {
                        break;
                    }
                }
                if scc.len() > 1 {
                    scc.sort();
                    self.found.push(scc);
                }
            }
        }
    }
    let names: Vec<&str> = modules.iter().map(String::as_str).collect();
    let id: HashMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let mut next = vec![Vec::new(); names.len()];
    for (a, b) in arrows {
        if let (Some(&a), Some(&b)) = (id.get(a), id.get(b)) {
            next[a].push(b);
        }
    }
    let n = names.len();
    let mut t = Tarjan { next, names, index: vec![None; n], low: vec![0; n], on_stack: vec![false; n], stack: Vec::new(), counter: 0, found: Vec::new() };
    for v in 0..n {
        if t.index[v].is_none() {
            t.visit(v);
        }
    }
    t.found.sort();
    t.found
}

/// Files over `MAX_LINES` not in `known`, and known ones now short enough (or gone); with the
/// number of known ones still over.
fn check_lengths(lengths: &BTreeMap<String, usize>, known: &[&str]) -> (Vec<String>, usize) {
    let mut problems = Vec::new();
    for (file, &n) in lengths {
        if n > MAX_LINES && !known.contains(&file.as_str()) {
            problems.push(format!("lb-userspace/src/{file} has {n} lines, over {MAX_LINES}: split it"));
        }
    }
    let mut still = 0;
    for file in known {
        match lengths.get(*file) {
            None => problems.push(format!("lb-userspace/src/{file} is gone: remove it from KNOWN_LONG in xtask/src/layers.rs")),
            Some(&n) if n <= MAX_LINES => problems.push(format!("lb-userspace/src/{file} has {n} lines now: remove it from KNOWN_LONG in xtask/src/layers.rs")),
            Some(_) => still += 1,
        }
    }
    (problems, still)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The crate-root names `src` refers to from module `modpath`, as `name` or `name!`.
    fn names(src: &str, modpath: &[&str]) -> BTreeSet<String> {
        let mut refs = Refs { modpath: modpath.iter().map(|s| (*s).to_owned()).collect(), found: Vec::new() };
        refs.visit_file(&syn::parse_file(src).unwrap());
        refs.found
            .into_iter()
            .map(|r| match r.name {
                Name::Root(n) => n,
                Name::Macro(n) => format!("{n}!"),
            })
            .collect()
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn use_trees_grouped_and_nested() {
        let src = "use crate::{a::X, b, c::{d::Y, e}};\nuse crate::f::{self, G};\nuse std::collections::HashMap;\nuse crate::g as h;";
        assert_eq!(names(src, &["m"]), set(&["a", "b", "c", "f", "g"]));
    }

    #[test]
    fn paths_in_expressions_and_types() {
        let src = "fn f(x: crate::t::T) -> Vec<crate::u::U> { crate::g::h(); <crate::q::Q as Default>::default(); todo!() }";
        assert_eq!(names(src, &["m"]), set(&["t", "u", "g", "q", "todo!"]));
    }

    #[test]
    fn test_only_items_are_skipped() {
        let src = "#[cfg(test)]\nmod tests { use crate::x; }\n#[cfg(test)]\nfn helper() { crate::y::z() }\n#[cfg(all(test, unix))]\nuse crate::w;\nstruct S;\nimpl S {\n    #[cfg(test)]\n    fn t() { crate::v::v() }\n}\nfn keep() { crate::kept::k() }";
        assert_eq!(names(src, &["m"]), set(&["kept"]));
    }

    #[test]
    fn super_stays_in_a_folder_module_but_not_at_the_top() {
        let src = "use super::cluster::C;\nfn f() { super::lock::g() }\nuse super::super::q;";
        assert_eq!(names(src, &["daemon", "state"]), set(&["q"]));
        assert_eq!(names("use super::bar::B;\nuse super::{baz, qux::Q};", &["foo"]), set(&["bar", "baz", "qux"]));
        // An inline module is one level deeper.
        assert_eq!(names("mod inner { use super::x; use super::super::bar::X; }", &["foo"]), set(&["bar"]));
        // `pub(super)` names an ancestor, not a dependency.
        assert_eq!(names("pub(super) fn f() {}", &["foo"]), set(&[]));
    }

    #[test]
    fn strings_and_comments_do_not_count() {
        let src = "// crate::c1::X\n/// crate::c2::X\n/* crate::c3 */\nfn f() { let s = \"crate::c4::X\"; }";
        assert_eq!(names(src, &["m"]), set(&[]));
    }

    #[test]
    fn macro_arguments_and_serde_paths_count() {
        let src = "fn f() { println!(\"{}\", crate::m1::X); outln!(\"x\"); assert!(a != b); }\n\
                   macro_rules! m { () => { $crate::m2::f() } }\n\
                   struct S { #[serde(default = \"d\", deserialize_with = \"crate::config::duration\")] d: u64 }";
        assert_eq!(names(src, &["m"]), set(&["m1", "m2", "config", "println!", "outln!", "assert!", "macro_rules!"]));
    }

    #[test]
    fn graph_resolves_reexports_macros_and_lines() {
        let files = [
            ("lib.rs", "pub mod a; pub mod b; pub mod cli;\npub use a::Error;"),
            ("a.rs", "pub enum Error {}"),
            ("b.rs", "fn f() -> crate::Error { outln!(\"x\");\n todo!() }"),
            ("cli/mod.rs", "pub mod out;\nuse crate::a;"),
            ("cli/out.rs", "#[macro_export]\nmacro_rules! outln { () => { $crate::cli::out::w() } }"),
            ("main.rs", "fn main() { lb_userspace::b::f(); }"),
        ];
        let files: Vec<_> = files.iter().map(|(f, t)| ((*f).to_owned(), (*t).to_owned())).collect();
        let (graph, lengths) = build_graph(&files).unwrap();
        assert_eq!(graph.modules, set(&["a", "b", "cli"]));
        let arrows: Vec<_> = graph.arrows.iter().map(|((a, b), sites)| format!("{a} -> {b} {}", sites_text(sites))).collect();
        assert_eq!(arrows, ["b -> a lb-userspace/src/b.rs:1", "b -> cli lb-userspace/src/b.rs:1", "cli -> a lb-userspace/src/cli/mod.rs:2"]);
        assert_eq!(lengths["b.rs"], 1);
    }

    const LAYERS_T: &[(&str, &[&str])] = &[("low", &["a", "b"]), ("high", &["c", "d"])];

    fn graph(arrows: &[(&str, &str)]) -> Graph {
        Graph { modules: set(&["a", "b", "c", "d"]), arrows: arrows.iter().map(|(a, b)| (((*a).to_owned(), (*b).to_owned()), vec![(format!("{a}.rs"), 7)])).collect() }
    }

    #[test]
    fn a_new_upward_arrow_fails() {
        let v = check(LAYERS_T, &[], &graph(&[("c", "a"), ("a", "c")]));
        assert_eq!(v.problems, ["new arrow upwards: a (layer low) -> c (layer high), in lb-userspace/src/a.rs:7: move the type down or invert the dependency"]);
    }

    #[test]
    fn a_known_upward_arrow_passes() {
        let v = check(LAYERS_T, &[("a", "c")], &graph(&[("a", "c"), ("c", "b"), ("d", "c")]));
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        assert_eq!(v.known, 1);
    }

    #[test]
    fn a_vanished_known_arrow_fails() {
        let v = check(LAYERS_T, &[("a", "c")], &graph(&[("c", "a")]));
        assert_eq!(v.problems, ["a -> c is gone: remove it from KNOWN_UPWARD in xtask/src/layers.rs"]);
        let v = check(LAYERS_T, &[("c", "a")], &graph(&[("c", "a")]));
        assert_eq!(v.problems, ["c -> a no longer goes upwards in LAYERS: remove it from KNOWN_UPWARD in xtask/src/layers.rs"]);
    }

    /// A new circle across layers needs an arrow upwards, which fails as such.
    #[test]
    fn a_new_circle_fails_through_its_upward_arrow() {
        let v = check(LAYERS_T, &[], &graph(&[("c", "a"), ("a", "c")]));
        assert_eq!(v.circles, [set(&["a", "c"]).into_iter().collect::<Vec<_>>()]);
        assert_eq!(v.problems.len(), 1);
        assert!(v.problems[0].starts_with("new arrow upwards: a (layer low) -> c"));
        // Known, the circle is only reported.
        let v = check(LAYERS_T, &[("a", "c")], &graph(&[("c", "a"), ("a", "c")]));
        assert!(v.problems.is_empty());
        assert_eq!(v.circles.len(), 1);
    }

    /// Arrows inside a layer are allowed, so a circle there has no upward arrow: caught apart.
    #[test]
    fn a_circle_inside_one_layer_fails() {
        let v = check(LAYERS_T, &[], &graph(&[("a", "b"), ("b", "a"), ("c", "d")]));
        assert_eq!(v.problems, ["circle inside layer low (2 modules): a, b: cut one of its arrows"]);
    }

    #[test]
    fn the_table_matches_the_tree() {
        let layers: &[(&str, &[&str])] = &[("low", &["a", "b", "x"]), ("high", &["c", "a"])];
        let v = check(layers, &[], &graph(&[]));
        assert_eq!(
            v.problems,
            [
                "module x is in LAYERS but not in lb-userspace/src: remove it from LAYERS in xtask/src/layers.rs",
                "module a is in two layers: keep it in one in LAYERS in xtask/src/layers.rs",
                "module d is in no layer: add it to LAYERS in xtask/src/layers.rs",
            ]
        );
    }

    #[test]
    fn long_files_ratchet() {
        let lengths: BTreeMap<String, usize> = [("a.rs", 501), ("b.rs", 500), ("c/d.rs", 900)].iter().map(|(f, n)| ((*f).to_owned(), *n)).collect();
        assert_eq!(check_lengths(&lengths, &["a.rs", "c/d.rs"]), (vec![], 2));
        let (problems, still) = check_lengths(&lengths, &["b.rs", "c/d.rs", "e.rs"]);
        assert_eq!(
            problems,
            [
                "lb-userspace/src/a.rs has 501 lines, over 500: split it",
                "lb-userspace/src/b.rs has 500 lines now: remove it from KNOWN_LONG in xtask/src/layers.rs",
                "lb-userspace/src/e.rs is gone: remove it from KNOWN_LONG in xtask/src/layers.rs",
            ]
        );
        assert_eq!(still, 1);
    }

    /// The real table lists every module once (the tree itself is checked by `cargo xtask layers`).
    #[test]
    fn layers_table_has_no_duplicates() {
        let all: Vec<_> = LAYERS.iter().flat_map(|(_, m)| m.iter()).collect();
        assert_eq!(all.len(), all.iter().collect::<BTreeSet<_>>().len());
    }
}
