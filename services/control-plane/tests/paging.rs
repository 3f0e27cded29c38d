//! Page sizes and page tokens: defaults and clamping, kind tags, filter fingerprints, tamper
//! detection, and a paged walk over a list.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ccm_control_plane::error::ApiError;
use ccm_control_plane::paging::{self, PageKind, PageRequest};
use ccm_proto::v1 as pb;
use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use tonic::Code;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct After {
    start: i64,
    id: String,
}

fn only_field(err: &ApiError) -> (&str, &str) {
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let v = err.field_violations();
    assert_eq!(v.len(), 1, "{v:?}");
    (v[0].field.as_str(), v[0].description.as_str())
}

#[test]
fn page_sizes_default_clamp_and_refuse_negatives() {
    for kind in PageKind::ALL {
        let limits = kind.limits();
        assert!(
            limits.default >= 1 && limits.default <= limits.max,
            "{kind:?}"
        );
        assert_eq!(paging::page_size(0, limits).ok(), Some(limits.default));
        assert_eq!(paging::page_size(1, limits).ok(), Some(1));
        let max = i32::try_from(limits.max).expect("small");
        assert_eq!(paging::page_size(max, limits).ok(), Some(limits.max));
        assert_eq!(
            paging::page_size(max + 1, limits).ok(),
            Some(limits.max),
            "clamped"
        );
        assert_eq!(paging::page_size(i32::MAX, limits).ok(), Some(limits.max));
        let err = paging::page_size(-1, limits).expect_err("negative");
        assert_eq!(only_field(&err).0, "page_size");
    }
    // The contracts' numbers.
    assert_eq!(
        PageKind::Definitions.limits(),
        paging::PageLimits {
            default: 50,
            max: 500
        }
    );
    assert_eq!(
        PageKind::Instances.limits(),
        paging::PageLimits {
            default: 100,
            max: 1000
        }
    );
    assert_eq!(
        PageKind::Workers.limits(),
        paging::PageLimits {
            default: 100,
            max: 1000
        }
    );
    assert_eq!(
        PageKind::Templates.limits(),
        paging::PageLimits {
            default: 100,
            max: 500
        }
    );
}

#[test]
fn a_token_decodes_only_for_its_own_list_and_filters() {
    let cursor = After {
        start: 1_800_000_000,
        id: "i-42".into(),
    };
    let token = paging::encode_page_token(PageKind::Workers, 7, &cursor);
    assert!(
        token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    );
    assert_eq!(
        paging::decode_page_token::<After>(&token, PageKind::Workers, 7).ok(),
        Some(Some(cursor.clone()))
    );
    assert_eq!(
        paging::decode_page_token::<After>("", PageKind::Workers, 7).ok(),
        Some(None),
        "empty token = first page"
    );

    // A ListWorkers token fed to ListInstances.
    let err =
        paging::decode_page_token::<After>(&token, PageKind::Instances, 7).expect_err("wrong list");
    let (field, why) = only_field(&err);
    assert_eq!(field, "page_token");
    assert!(
        why.contains("workers") && why.contains("instances"),
        "{why}"
    );

    // Filters changed between pages.
    let err =
        paging::decode_page_token::<After>(&token, PageKind::Workers, 8).expect_err("filters");
    assert!(only_field(&err).1.contains("different filters"));

    // A cursor of another shape.
    let err = paging::decode_page_token::<u64>(&token, PageKind::Workers, 7).expect_err("shape");
    assert_eq!(only_field(&err).0, "page_token");
}

#[test]
fn tampered_truncated_and_made_up_tokens_are_refused() {
    let token = paging::encode_page_token(
        PageKind::Instances,
        1,
        &After {
            start: 1,
            id: "a".into(),
        },
    );
    let bytes = URL_SAFE_NO_PAD.decode(&token).expect("base64url");

    // Flip one bit anywhere: refused.
    for i in 0..bytes.len() {
        let mut edited = bytes.clone();
        edited[i] ^= 0x01;
        let forged = URL_SAFE_NO_PAD.encode(&edited);
        let err = paging::decode_page_token::<After>(&forged, PageKind::Instances, 1)
            .expect_err("tampered");
        assert_eq!(only_field(&err).0, "page_token", "byte {i}");
    }
    // Truncated.
    assert!(
        paging::decode_page_token::<After>(&token[..token.len() - 3], PageKind::Instances, 1)
            .is_err()
    );
    // Not base64url, too long, or plain JSON.
    for bad in ["not a token!", "{\"k\":\"instances\"}", "AAAA"] {
        assert!(
            paging::decode_page_token::<After>(bad, PageKind::Instances, 1).is_err(),
            "{bad}"
        );
    }
    let long = "A".repeat(paging::MAX_PAGE_TOKEN_LEN + 1);
    assert!(paging::decode_page_token::<After>(&long, PageKind::Instances, 1).is_err());
}

#[test]
fn filter_fingerprints_follow_the_filters_not_the_paging_fields() {
    let base = pb::ListInstancesRequest {
        states: vec![pb::InstanceState::Running as i32],
        owner_id: "alice".into(),
        ..Default::default()
    };
    let strip = |mut r: pb::ListInstancesRequest| {
        r.page_size = 0;
        r.page_token.clear();
        r
    };
    let fp = paging::filter_fingerprint(&strip(base.clone()));
    let next_page = pb::ListInstancesRequest {
        page_size: 10,
        page_token: "abc".into(),
        ..base.clone()
    };
    assert_eq!(paging::filter_fingerprint(&strip(next_page)), fp);
    let other = pb::ListInstancesRequest {
        owner_id: "bob".into(),
        ..base
    };
    assert_ne!(paging::filter_fingerprint(&strip(other)), fp);
}

#[test]
fn page_request_reports_both_fields_together() {
    let err =
        paging::page_request::<After>(PageKind::Templates, -5, "garbage", 0).expect_err("both bad");
    let fields: Vec<&str> = err
        .field_violations()
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    assert_eq!(fields, ["page_size", "page_token"]);
}

/// A paged walk over a sorted list: every item once, in order, and an empty token at the end.
#[test]
fn walking_a_list_page_by_page_sees_every_item_once() {
    let items: Vec<After> = (0..23)
        .map(|i| After {
            start: 1000 + i / 3,
            id: format!("i-{i:02}"),
        })
        .collect();
    let fp = 99;
    let mut token = String::new();
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let PageRequest { page_size, cursor } =
            paging::page_request::<After>(PageKind::Instances, 5, &token, fp).expect("valid");
        let page: Vec<After> = items
            .iter()
            .filter(|it| {
                cursor
                    .as_ref()
                    .is_none_or(|c| (it.start, &it.id) > (c.start, &c.id))
            })
            .take(page_size)
            .cloned()
            .collect();
        pages += 1;
        token =
            paging::next_page_token(PageKind::Instances, fp, page.len(), page_size, page.last());
        seen.extend(page);
        if token.is_empty() {
            break;
        }
        assert!(pages < 10, "the walk terminates");
    }
    assert_eq!(seen, items);
    assert_eq!(pages, 5);
}

proptest! {
    #[test]
    fn tokens_round_trip_for_any_cursor(start in any::<i64>(), id in ".{0,40}", fp in any::<u64>()) {
        let cursor = After { start, id };
        for kind in PageKind::ALL {
            let token = paging::encode_page_token(kind, fp, &cursor);
            prop_assert_eq!(
                paging::decode_page_token::<After>(&token, kind, fp).ok(),
                Some(Some(cursor.clone()))
            );
        }
    }

    #[test]
    fn decoding_arbitrary_text_never_panics(s in ".{0,200}") {
        let _ = paging::decode_page_token::<After>(&s, PageKind::Workers, 0);
    }
}
