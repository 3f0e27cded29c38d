//! Tests of definition versions and artifact hashes (`ccm_core::version`).

use ccm_core::CoreError;
use ccm_core::version::{
    Version, content_hash, min_version_satisfied, next_version_on_sync, parse_content_hash,
    sha256_hex,
};
use proptest::prelude::*;

fn v(s: &str) -> Version {
    s.parse().unwrap()
}

fn why(input: &str) -> String {
    match input.parse::<Version>() {
        Err(CoreError::InvalidVersion { input: got, why }) => {
            assert_eq!(got, input);
            why
        }
        other => panic!("{input:?}: expected InvalidVersion, got {other:?}"),
    }
}

#[test]
fn parses_and_displays() {
    assert_eq!(v("1.2.3"), Version::new(1, 2, 3));
    assert_eq!(v("0.0.0"), Version::default());
    assert_eq!(v("10.20.30").to_string(), "10.20.30");
    let max = format!("{0}.{0}.{0}", u64::MAX);
    assert_eq!(v(&max), Version::new(u64::MAX, u64::MAX, u64::MAX));
    assert_eq!(v(&max).to_string(), max);
}

#[test]
fn orders_numerically_not_lexically() {
    assert!(v("1.10.0") > v("1.9.0"));
    assert!(v("1.9.10") > v("1.9.9"));
    assert!(v("2.0.0") > v("1.99.99"));
    assert!(v("0.0.1") > v("0.0.0"));
    let mut all = [v("1.10.0"), v("1.2.0"), v("0.9.9"), v("1.2.10"), v("1.2.9")];
    all.sort();
    let sorted: Vec<String> = all.iter().map(Version::to_string).collect();
    assert_eq!(sorted, ["0.9.9", "1.2.0", "1.2.9", "1.2.10", "1.10.0"]);
}

#[test]
fn bumps_reset_lower_parts() {
    let x = v("1.4.2");
    assert_eq!(x.bump_major(), v("2.0.0"));
    assert_eq!(x.bump_minor(), v("1.5.0"));
    assert_eq!(x.bump_patch(), v("1.4.3"));
    assert_eq!(v("0.9.9").bump_minor(), v("0.10.0"));
    assert_eq!(x, v("1.4.2"), "bumps return a new value");
}

#[test]
fn every_refusal_says_why() {
    let cases: &[(&str, &str)] = &[
        ("", "empty"),
        ("1.2", "found 2"),
        ("1", "found 1"),
        ("1.2.3.4", "found 4"),
        ("1..3", "minor part is empty"),
        (".2.3", "major part is empty"),
        ("1.2.", "patch part is empty"),
        ("01.2.3", "major part \"01\" has a leading zero"),
        ("1.02.3", "minor part \"02\" has a leading zero"),
        ("1.2.00", "patch part \"00\" has a leading zero"),
        ("1.x.3", "minor part \"x\" is not a number"),
        ("1.2.3a", "patch part \"3a\" is not a number"),
        ("1.2.٣", "is not a number"),
        ("1.2.3-rc.1", "pre-release suffix \"-rc.1\" is not accepted"),
        (
            "1.2.3+build.5",
            "build metadata suffix \"+build.5\" is not accepted",
        ),
        ("-1.2.3", "major part \"-1\" is not a number"),
        (" 1.2.3", "surrounding whitespace"),
        ("1.2.3\n", "surrounding whitespace"),
        ("v1.2.3", "leading 'v'"),
        (
            "18446744073709551616.0.0",
            "major part 18446744073709551616 overflows",
        ),
        ("1.2. 3", "is not a number"),
    ];
    for (input, want) in cases {
        let got = why(input);
        assert!(
            got.contains(want),
            "{input:?}: {got:?} should contain {want:?}"
        );
    }
}

#[test]
fn serde_uses_the_string_form() {
    let x = v("3.14.159");
    assert_eq!(serde_json::to_string(&x).unwrap(), "\"3.14.159\"");
    assert_eq!(serde_json::from_str::<Version>("\"3.14.159\"").unwrap(), x);
    let err = serde_json::from_str::<Version>("\"3.14\"").unwrap_err();
    assert!(err.to_string().contains("found 2"), "{err}");
    assert!(serde_json::from_str::<Version>("{\"major\":1,\"minor\":2,\"patch\":3}").is_err());
    assert!(serde_json::from_str::<Version>("123").is_err());
}

#[test]
fn sha256_of_known_inputs() {
    assert_eq!(
        sha256_hex(b""),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(
        sha256_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(
        content_hash(b"abc"),
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[test]
fn content_hash_is_read_in_both_forms() {
    let hex = sha256_hex(b"lab");
    assert_eq!(parse_content_hash(&hex).unwrap(), hex);
    assert_eq!(parse_content_hash(&content_hash(b"lab")).unwrap(), hex);
    assert_eq!(parse_content_hash(&hex.to_uppercase()).unwrap(), hex);
    assert_eq!(
        parse_content_hash(&format!("SHA256:{hex}")).unwrap(),
        hex,
        "prefix case-insensitive"
    );
}

#[test]
fn content_hash_refusals() {
    let hex = sha256_hex(b"lab");
    for (input, want) in [
        (format!("md5:{hex}"), "unsupported hash algorithm \"md5\""),
        (hex[..63].to_owned(), "64 hex digits, got 63"),
        (format!("{hex}0"), "got 65"),
        (String::new(), "got 0"),
        ("sha256:".to_owned(), "got 0"),
        (format!("g{}", &hex[1..]), "'g' is not a hex digit"),
        (format!(" {}", &hex[1..]), "' ' is not a hex digit"),
    ] {
        match parse_content_hash(&input) {
            Err(CoreError::Invalid { field, message }) => {
                assert_eq!(field, "hash");
                assert!(message.contains(want), "{input:?}: {message:?}");
            }
            other => panic!("{input:?}: {other:?}"),
        }
    }
}

#[test]
fn sync_bumps_patch_only_when_the_hash_changes() {
    let current = v("1.4.2");
    let a = content_hash(b"lab v1");
    let b = content_hash(b"lab v2");
    assert_eq!(next_version_on_sync(current, &a, &a), None);
    assert_eq!(next_version_on_sync(current, &a, &b), Some(v("1.4.3")));
    // The stored bare form and the event form of one hash are the same hash.
    let bare = sha256_hex(b"lab v1");
    assert_eq!(next_version_on_sync(current, &bare, &a), None);
    assert_eq!(
        next_version_on_sync(current, &a, &bare.to_uppercase()),
        None
    );
    assert_eq!(next_version_on_sync(current, &bare, &b), Some(v("1.4.3")));
    // Unreadable hashes are compared as given.
    assert_eq!(next_version_on_sync(current, "", &a), Some(v("1.4.3")));
    assert_eq!(next_version_on_sync(current, "junk", "junk"), None);
}

#[test]
fn lenient_parse_of_observed_cml_versions() {
    type Parts = Option<(u64, u64, u64)>;
    let cases: &[(&str, Parts)] = &[
        ("2.9.0", Some((2, 9, 0))),
        ("2.9", Some((2, 9, 0))),
        ("2", Some((2, 0, 0))),
        ("2.9.1+build42", Some((2, 9, 1))),
        ("2.9.1-rc1", Some((2, 9, 1))),
        ("v2.9.1", Some((2, 9, 1))),
        (" 2.10.0\n", Some((2, 10, 0))),
        ("2.09.01", Some((2, 9, 1))),
        ("2.9.1.4", Some((2, 9, 1))),
        ("2.9.", Some((2, 9, 0))),
        ("2.x", Some((2, 0, 0))),
        ("", None),
        ("cml", None),
        ("v", None),
        (".9", None),
        ("99999999999999999999", None),
    ];
    for (input, want) in cases {
        let got = Version::parse_lenient(input);
        assert_eq!(
            got,
            want.map(|(a, b, c)| Version::new(a, b, c)),
            "{input:?}"
        );
    }
}

#[test]
fn min_version_check() {
    let min = v("2.9.0");
    assert!(min.is_satisfied_by("2.9.0"));
    assert!(min.is_satisfied_by("2.9"));
    assert!(min.is_satisfied_by("2.9.1+build"));
    assert!(min.is_satisfied_by("2.10"));
    assert!(min.is_satisfied_by("3.0.0"));
    assert!(!min.is_satisfied_by("2.8.99"));
    assert!(!min.is_satisfied_by("2"));
    assert!(!min.is_satisfied_by("unknown"));
    assert!(!min.is_satisfied_by(""));

    assert!(min_version_satisfied("2.9.1+build", "2.9"));
    assert!(min_version_satisfied("2.9", "2.9.0"));
    assert!(!min_version_satisfied("2.8.5", "2.9"));
    assert!(!min_version_satisfied("2.9.0", "latest"));
    assert!(!min_version_satisfied("garbage", "2.9"));
}

proptest! {
    #[test]
    fn display_then_parse_round_trips(major: u64, minor: u64, patch: u64) {
        let x = Version::new(major, minor, patch);
        let text = x.to_string();
        prop_assert_eq!(text.parse::<Version>().unwrap(), x);
        prop_assert_eq!(Version::parse_lenient(&text), Some(x));
        let json = serde_json::to_string(&x).unwrap();
        prop_assert_eq!(serde_json::from_str::<Version>(&json).unwrap(), x);
    }

    #[test]
    fn order_matches_the_tuple_order(a: (u16, u16, u16), b: (u16, u16, u16)) {
        let va = Version::new(a.0.into(), a.1.into(), a.2.into());
        let vb = Version::new(b.0.into(), b.1.into(), b.2.into());
        prop_assert_eq!(va.cmp(&vb), a.cmp(&b));
        let pa: Version = va.to_string().parse().unwrap();
        prop_assert_eq!(pa.cmp(&vb), a.cmp(&b));
    }

    #[test]
    fn bumps_are_strictly_greater(major in 0u64..1000, minor in 0u64..1000, patch in 0u64..1000) {
        let x = Version::new(major, minor, patch);
        prop_assert!(x.bump_patch() > x);
        prop_assert!(x.bump_minor() > x.bump_patch());
        prop_assert!(x.bump_major() > x.bump_minor());
    }

    #[test]
    fn strict_parse_never_panics_and_accepts_only_canonical_text(s in "(?s).{0,30}") {
        if let Ok(x) = s.parse::<Version>() {
            prop_assert_eq!(x.to_string(), s.clone());
        }
        let _ = Version::parse_lenient(&s);
    }

    #[test]
    fn hash_forms_agree(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let hex = sha256_hex(&bytes);
        prop_assert_eq!(hex.len(), 64);
        prop_assert!(hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        prop_assert_eq!(content_hash(&bytes), format!("sha256:{hex}"));
        prop_assert_eq!(parse_content_hash(&content_hash(&bytes)).unwrap(), hex);
    }
}
