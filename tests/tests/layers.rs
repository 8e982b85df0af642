//! The workspace's arrows point one way: neither plane's crate depends on the other (the shared
//! runtime depends on neither), no crate has an import cycle between its modules, and the data
//! plane's modules import only modules of their own layer or below (edge -> authorization -> cache
//! logic -> store and upstream client). Unsafe code is denied everywhere but in the one module
//! that maps files (`data-plane/src/mapped.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use wharf_tests::layers::{ModuleGraph, display, module_graph, workspace_deps};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").to_path_buf()
}

/// Crate directories of the workspace (every folder beside `tests/` with a `Cargo.toml`).
fn members() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(root())
        .expect("the workspace root")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("Cargo.toml").exists() && p.join("src").is_dir())
        .collect();
    out.sort();
    out
}

/// Every workspace crate a crate depends on, directly or through another workspace crate.
fn closure(direct: &BTreeMap<String, BTreeSet<String>>, name: &str) -> BTreeSet<String> {
    let (mut seen, mut todo) = (BTreeSet::new(), vec![name.to_owned()]);
    while let Some(n) = todo.pop() {
        for d in direct.get(&n).into_iter().flatten() {
            if seen.insert(d.clone()) {
                todo.push(d.clone());
            }
        }
    }
    seen
}

#[test]
fn layers_neither_plane_depends_on_the_other() {
    let mut direct = BTreeMap::new();
    for dir in members() {
        let (name, deps) = workspace_deps(&dir.join("Cargo.toml")).expect("Cargo.toml");
        direct.insert(name, deps);
    }
    for crate_name in ["wharf-control", "wharf-proxy", "wharf-runtime", "wharf-cli"] {
        assert!(direct.contains_key(crate_name), "no crate {crate_name} in {:?}", direct.keys());
    }
    let deps = |n: &str| closure(&direct, n);
    assert!(
        !deps("wharf-control").contains("wharf-proxy"),
        "wharf-control depends on the data plane: {:?}",
        deps("wharf-control")
    );
    assert!(
        !deps("wharf-proxy").contains("wharf-control"),
        "wharf-proxy depends on the control plane: {:?}",
        deps("wharf-proxy")
    );
    for plane in ["wharf-control", "wharf-proxy"] {
        assert!(deps(plane).contains("wharf-runtime"), "{plane} does not use the shared runtime");
        assert!(!deps("wharf-runtime").contains(plane), "wharf-runtime depends on {plane}");
        assert!(!deps("wharf-cli").contains(plane), "regctl links {plane}");
    }
    // Only the all-in-one binary and the tests join the two planes.
    let joined: Vec<&String> =
        direct.keys().filter(|n| deps(n).contains("wharf-control") && deps(n).contains("wharf-proxy")).collect();
    assert!(joined.iter().all(|n| *n == "wharf-dev"), "crates linking both planes: {joined:?}");
}

#[test]
fn layers_no_crate_has_an_import_cycle() {
    let mut report = String::new();
    let mut crates = 0;
    for dir in members() {
        let graph = module_graph(&dir.join("src")).expect("sources");
        assert!(!graph.modules.is_empty(), "no modules read in {}", dir.display());
        crates += 1;
        for cycle in graph.cycles() {
            report.push_str(&format!(
                "{}: {}\n{}",
                dir.display(),
                cycle.iter().map(display).collect::<Vec<_>>().join(", "),
                graph.explain(&cycle)
            ));
        }
    }
    assert!(crates >= 7, "only {crates} crates read");
    assert!(report.is_empty(), "import cycles:\n{report}");
}

/// The data plane's layers, top first. A module's layer is that of its longest listed prefix.
const DATA_PLANE_LAYERS: &[(&str, &[&str])] = &[
    ("node", &["crate", "node", "managed"]),
    ("edge", &["server", "registry"]),
    ("cache logic", &["cache"]),
    ("authorization", &["authz"]),
    ("request", &["state", "request_log", "respond"]),
    ("fetch", &["flight", "decisions"]),
    ("store and upstream", &["store", "evict", "scrub", "upstream", "peers"]),
    (
        "foundations",
        &[
            "config",
            "credentials",
            "node_token",
            "private_file",
            "error",
            "oci",
            "metrics",
            "range",
            "bufpool",
            "mapped",
        ],
    ),
];

fn layer_of(module: &str) -> Option<usize> {
    let top = module.split("::").next().unwrap_or(module);
    DATA_PLANE_LAYERS.iter().position(|(_, mods)| mods.contains(&top))
}

#[test]
fn layers_data_plane_reads_in_one_direction() {
    let graph: ModuleGraph = module_graph(&root().join("data-plane/src")).expect("sources");
    let unplaced: Vec<String> = graph.modules.iter().map(display).filter(|m| layer_of(m).is_none()).collect();
    assert!(unplaced.is_empty(), "modules in no layer (add them to DATA_PLANE_LAYERS): {unplaced:?}");
    let upward: Vec<String> = graph
        .edges
        .iter()
        .filter(|e| layer_of(&display(&e.from)) > layer_of(&display(&e.to)))
        .map(|e| {
            let (from, to) = (display(&e.from), display(&e.to));
            let name = |m: &str| layer_of(m).map_or("?", |l| DATA_PLANE_LAYERS[l].0);
            format!("{from} ({}) -> {to} ({}) at {}:{}", name(&from), name(&to), e.file.display(), e.line)
        })
        .collect();
    assert!(upward.is_empty(), "imports of a higher layer:\n{}", upward.join("\n"));
    // The reading holds something: the edge reaches the cache, the cache the store and upstream.
    assert!(graph.refers("registry", "cache").is_some());
    assert!(graph.refers("cache::blobs", "flight").is_some());
    assert!(graph.refers("flight", "store").is_some() && graph.refers("flight", "upstream").is_some());
}

/// `unsafe_code` is denied for the workspace (not forbidden, so that one module may allow it):
/// the memory maps of `data-plane/src/mapped.rs` are the only exception, and stay the only one.
#[test]
fn layers_only_the_memory_maps_allow_unsafe_code() {
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).expect("the workspace manifest");
    assert!(manifest.contains("unsafe_code = \"deny\""), "the workspace denies unsafe code");
    let allowing: Vec<String> = members()
        .iter()
        .flat_map(|m| wharf_tests::files_under(m))
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .filter(|p| std::fs::read_to_string(p).is_ok_and(|t| t.contains(concat!("allow(", "unsafe_code)"))))
        .map(|p| p.strip_prefix(root()).unwrap_or(&p).display().to_string())
        .collect();
    assert_eq!(allowing, ["data-plane/src/mapped.rs"], "files that allow unsafe code");
}
