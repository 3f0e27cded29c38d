//! Decides at build time whether the MongoDB conformance tests exist.
//!
//! With `CCM_TEST_MONGO_URI` set (non-empty), the cfg `ccm_mongo_conformance` is on and
//! tests/mongo.rs compiles one test per conformance case against that server. Without it, the
//! only MongoDB test is `mongodb_conformance_requires_ccm_test_mongo_uri`, which says loudly that
//! the MongoDB part of the suite was NOT run — so a run without a server can never look like a
//! run that tested MongoDB. Cargo rebuilds the tests whenever the variable changes.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(ccm_mongo_conformance)");
    println!("cargo::rerun-if-env-changed=CCM_TEST_MONGO_URI");
    println!("cargo::rerun-if-changed=build.rs");
    let set = std::env::var("CCM_TEST_MONGO_URI").is_ok_and(|v| !v.trim().is_empty());
    if set {
        println!("cargo::rustc-cfg=ccm_mongo_conformance");
    }
}
