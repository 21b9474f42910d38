//! Generates bindings to the system libdpdk with bindgen and compiles C wrappers for DPDK's
//! `static inline` API (rx/tx burst, mbuf alloc/free, rings...), which has no symbol to link.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const MIN_VERSION: &str = "22.11";

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rerun-if-changed=shim.c");

    let lib = match pkg_config::Config::new()
        .atleast_version(MIN_VERSION)
        .probe("libdpdk")
    {
        Ok(lib) => lib,
        Err(err) => {
            // A clear error, not a wall of linker noise: say what to install.
            panic!(
                "\n\nclonecluster needs the DPDK development files (libdpdk >= {MIN_VERSION}) found \
                 through pkg-config, and libclang for bindgen.\n\
                 On Debian 12 install them with:\n\n    \
                 apt-get install -y dpdk dpdk-dev libdpdk-dev pkg-config clang libclang-dev\n\n\
                 pkg-config said: {err}\n"
            );
        }
    };

    // The raw cflags (-include rte_config.h, -march, the include dirs) are what DPDK expects
    // every translation unit that includes its headers to be compiled with.
    let cflags = Command::new("pkg-config")
        .args(["--cflags", "libdpdk"])
        .output()
        .expect("pkg-config ran a moment ago");
    let cflags: Vec<String> = String::from_utf8_lossy(&cflags.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();

    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let wrappers = out.join("static_fns");

    let mut builder = bindgen::Builder::default()
        .header("wrapper.h")
        .clang_args(&cflags)
        .allowlist_function("rte_.*")
        .allowlist_function("clonecluster_.*")
        .allowlist_type("rte_.*")
        .allowlist_var("RTE_.*")
        .allowlist_var("rte_.*")
        // Packed structs with aligned members that bindgen cannot lay out: never used by value.
        .opaque_type("rte_arp_ipv4")
        .opaque_type("rte_arp_hdr")
        .opaque_type("rte_l2tpv2_.*")
        .opaque_type("rte_gtp_psc_.*")
        .derive_default(true)
        .layout_tests(false)
        .generate_comments(false)
        .wrap_static_fns(true)
        .wrap_static_fns_path(&wrappers)
        .clang_macro_fallback()
        .clang_macro_fallback_build_dir(&out)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    for path in &lib.include_paths {
        builder = builder.clang_arg(format!("-I{}", path.display()));
    }
    let bindings = builder.generate().unwrap_or_else(|err| {
        panic!(
            "\n\nbindgen could not read the DPDK headers: {err}\n\
             Install libclang and the headers: apt-get install -y clang libclang-dev libdpdk-dev\n"
        )
    });
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("write bindings.rs");

    let mut cc = cc::Build::new();
    cc.file(wrappers.with_extension("c"))
        .file("shim.c")
        .include(env::current_dir().expect("cwd"))
        .warnings(false)
        .opt_level(3);
    for flag in &cflags {
        cc.flag(flag);
    }
    cc.compile("clonecluster_dpdk_wrappers");
}
