//! Every element of package `ccm.v1` has a leading doc comment: messages,
//! fields, oneofs, enums, enum values, services, RPCs and extensions.
//!
//! Read from the `source_code_info` that build.rs keeps in the embedded
//! descriptor set (prost-build runs protoc with `--include_source_info`). A
//! missing source info is itself a failure, and the last test proves the
//! check fails on an undocumented file.

use std::collections::HashMap;

use ccm_proto::{PACKAGE, descriptor_pool};
use prost_reflect::{DescriptorPool, FileDescriptor};
use prost_types::{
    DescriptorProto, EnumDescriptorProto, EnumValueDescriptorProto, FieldDescriptorProto,
    FileDescriptorProto, MethodDescriptorProto, ServiceDescriptorProto, SourceCodeInfo,
    field_descriptor_proto, source_code_info::Location,
};

/// Leading comments of a file, by source location path.
fn leading_comments(file: &FileDescriptor) -> Option<HashMap<Vec<i32>, String>> {
    let info = file.file_descriptor_proto().source_code_info.as_ref()?;
    Some(
        info.location
            .iter()
            .filter_map(|l| {
                l.leading_comments
                    .as_ref()
                    .map(|c| (l.path.clone(), c.trim().to_owned()))
            })
            .collect(),
    )
}

fn doc_violations(pool: &DescriptorPool) -> (usize, Vec<String>) {
    let mut checked = 0;
    let mut out = Vec::new();
    let mut comments: HashMap<String, HashMap<Vec<i32>, String>> = HashMap::new();
    for file in pool.files().filter(|f| f.package_name() == PACKAGE) {
        match leading_comments(&file) {
            Some(c) => {
                comments.insert(file.name().to_owned(), c);
            }
            None => out.push(format!(
                "{}: no source_code_info in the descriptor set",
                file.name()
            )),
        }
    }
    let mut check = |file: &FileDescriptor, path: &[i32], what: String| {
        checked += 1;
        let documented = comments
            .get(file.name())
            .and_then(|c| c.get(path))
            .is_some_and(|c| !c.is_empty());
        if !documented {
            out.push(format!("{}: {what} has no leading comment", file.name()));
        }
    };
    for message in pool.all_messages().filter(|m| m.package_name() == PACKAGE) {
        if message.is_map_entry() {
            continue; // synthesised by protoc for map<,> fields
        }
        let file = message.parent_file();
        check(
            &file,
            message.path(),
            format!("message {}", message.full_name()),
        );
        for field in message.fields() {
            check(&file, field.path(), format!("field {}", field.full_name()));
        }
        for oneof in message.oneofs().filter(|o| !o.is_synthetic()) {
            check(&file, oneof.path(), format!("oneof {}", oneof.full_name()));
        }
    }
    for en in pool.all_enums().filter(|e| e.package_name() == PACKAGE) {
        let file = en.parent_file();
        check(&file, en.path(), format!("enum {}", en.full_name()));
        for value in en.values() {
            check(
                &file,
                value.path(),
                format!("enum value {}", value.full_name()),
            );
        }
    }
    for service in pool.services().filter(|s| s.package_name() == PACKAGE) {
        let file = service.parent_file();
        check(
            &file,
            service.path(),
            format!("service {}", service.full_name()),
        );
        for method in service.methods() {
            check(&file, method.path(), format!("rpc {}", method.full_name()));
        }
    }
    for ext in pool
        .all_extensions()
        .filter(|e| e.package_name() == PACKAGE)
    {
        let file = ext.parent_file();
        check(&file, ext.path(), format!("extension {}", ext.full_name()));
    }
    (checked, out)
}

#[test]
fn every_element_is_documented() {
    let (checked, violations) = doc_violations(descriptor_pool());
    assert!(
        violations.is_empty(),
        "undocumented:\n{}",
        violations.join("\n")
    );
    // Sanity: the walk really visited the contracts (dozens of messages,
    // hundreds of fields).
    assert!(checked > 500, "only {checked} elements checked");
}

#[test]
fn descriptor_set_keeps_source_info_for_imports_too() {
    let pool = descriptor_pool();
    for name in [
        "google/api/http.proto",
        "google/api/annotations.proto",
        "google/protobuf/timestamp.proto",
        "google/protobuf/descriptor.proto",
    ] {
        assert!(
            pool.get_file_by_name(name).is_some(),
            "{name} missing from the set"
        );
    }
    let http = pool
        .get_file_by_name("google/api/http.proto")
        .expect("http.proto");
    assert!(http.file_descriptor_proto().source_code_info.is_some());
}

#[test]
fn check_fails_on_undocumented_elements() {
    let mut pool = descriptor_pool().clone();
    let string = field_descriptor_proto::Type::String as i32;
    let file = FileDescriptorProto {
        name: Some("ccm/v1/zz_undocumented.proto".into()),
        package: Some(PACKAGE.into()),
        syntax: Some("proto3".into()),
        message_type: vec![DescriptorProto {
            name: Some("Undocumented".into()),
            field: vec![FieldDescriptorProto {
                name: Some("field".into()),
                number: Some(1),
                r#type: Some(string),
                json_name: Some("field".into()),
                label: Some(field_descriptor_proto::Label::Optional as i32),
                ..Default::default()
            }],
            ..Default::default()
        }],
        enum_type: vec![EnumDescriptorProto {
            name: Some("UndocumentedEnum".into()),
            value: vec![EnumValueDescriptorProto {
                name: Some("UNDOCUMENTED_ENUM_UNSPECIFIED".into()),
                number: Some(0),
                ..Default::default()
            }],
            ..Default::default()
        }],
        service: vec![ServiceDescriptorProto {
            name: Some("UndocumentedService".into()),
            method: vec![MethodDescriptorProto {
                name: Some("Call".into()),
                input_type: Some(".ccm.v1.Undocumented".into()),
                output_type: Some(".ccm.v1.Undocumented".into()),
                ..Default::default()
            }],
            ..Default::default()
        }],
        // The message itself is documented, nothing else is.
        source_code_info: Some(SourceCodeInfo {
            location: vec![Location {
                path: vec![4, 0],
                span: vec![0, 0, 0],
                leading_comments: Some(" Documented message.\n".into()),
                ..Default::default()
            }],
        }),
        ..Default::default()
    };
    pool.add_file_descriptor_proto(file)
        .expect("test file is a valid descriptor");
    let (_, violations) = doc_violations(&pool);
    let expect = [
        "field ccm.v1.Undocumented.field",
        "enum ccm.v1.UndocumentedEnum",
        "UNDOCUMENTED_ENUM_UNSPECIFIED has no leading comment",
        "service ccm.v1.UndocumentedService",
        "rpc ccm.v1.UndocumentedService.Call",
    ];
    for e in expect {
        assert!(
            violations.iter().any(|v| v.contains(e)),
            "{e} not reported: {violations:?}"
        );
    }
    assert!(
        !violations
            .iter()
            .any(|v| v.contains("message ccm.v1.Undocumented ")),
        "{violations:?}"
    );
    assert_eq!(violations.len(), expect.len(), "{violations:?}");
}
