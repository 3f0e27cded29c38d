//! Benchmark of the lab YAML port rewrite on a generated 50-node CML lab.
//!
//! `rewrite_ports` is the one-shot call (two YAML parses); `PreparedLab::render` is the
//! per-instance cost once a definition version's lab has been prepared.
//!
//! Run: `cargo bench -p ccm-core --bench labyaml -- --warm-up-time 1 --measurement-time 3`

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::hint::black_box;

use ccm_core::labyaml::{
    PreparedLab, RewriteMode, rewrite_ports, rewrite_ports_detailed, validate_against_ports,
};
use criterion::{Criterion, criterion_group, criterion_main};

const NODES: usize = 50;
/// Every other node also exposes a VNC port.
const VNC_EVERY: usize = 2;
/// Smart annotations (tag + label each) for the first this many serial ports.
const ANNOTATED: usize = 12;

/// A 50-node lab in CML's export format: 50 serial ports and 25 VNC ports (75 ports), 99
/// placeholders (75 in node tags, 24 in smart annotation tags and labels), IOS-style and
/// cloud-init configurations of 30-60 lines per node, links between neighbours.
fn lab() -> (String, Vec<String>) {
    let mut ports = Vec::new();
    let mut y = String::with_capacity(256 * 1024);
    y.push_str("annotations:\n");
    for i in 0..4 {
        let _ = write!(
            y,
            "    - border_color: '#00000000'\n      border_style: ''\n      color: '#808080FF'\n      rotation: 0\n      text_bold: false\n      text_content: 10.{i}.0.0/16\n      text_font: monospace\n      text_italic: false\n      text_size: 12\n      text_unit: pt\n      thickness: 1\n      type: text\n      x1: {}.0\n      y1: -300.0\n      z_index: {i}\n",
            i * 200
        );
    }
    y.push_str("smart_annotations:\n");
    for i in 1..=ANNOTATED {
        let _ = write!(
            y,
            "    - tag: serial:${{PORT_SERIAL_{i}}}\n      is_on: true\n      padding: 35\n      label: serial:${{PORT_SERIAL_{i}}}\n      tag_offset_x: 0\n      tag_offset_y: 0\n      tag_size: 14\n      group_distance: 400\n      thickness: 1\n      border_style: ''\n      fill_color: '#FFD10080'\n      border_color: '#00000080'\n      z_index: {}\n",
            20 + i
        );
    }
    y.push_str("nodes:\n");
    for n in 0..NODES {
        let serial = n + 1;
        ports.push(format!("serial_{serial}"));
        let vnc = (n % VNC_EVERY == 0).then(|| n / VNC_EVERY + 1);
        if let Some(v) = vnc {
            ports.push(format!("vnc_{v}"));
        }
        let _ = write!(y, "    - boot_disk_size: null\n      configuration:\n");
        if vnc.is_some() {
            let _ = write!(
                y,
                "          - name: user-data\n            content: |-\n                #cloud-config\n                hostname: desktop-{n}\n                manage_etc_hosts: True\n                ssh_pwauth: True\n                users:\n                  - name: cisco\n                    sudo: ALL=(ALL) NOPASSWD:ALL\n                    shell: /bin/bash\n                    plain_text_passwd: cisco\n                    lock_passwd: false\n                write_files:\n                  - path: /usr/local/bin/lab-setup.sh\n                    permissions: \"0755\"\n                    content: |\n                      #!/bin/bash\n                      set -e\n                      sleep 15\n                      echo \"console ${{PORT_SERIAL_{serial}}} is not ours to touch\"\n                      echo \"Lab setup completed at $(date)\" >> /var/log/lab-setup.log\n                runcmd:\n                  - chown -R cisco:cisco /home/cisco/Desktop/tasks\n                  - /usr/local/bin/lab-setup.sh >> /var/log/lab-setup.log 2>&1\n                bootcmd:\n                  - echo \"System booted at $(date)\" >> /var/log/boot-times.log\n          - name: network-config\n            content: |-\n                network:\n                  version: 2\n                  ethernets:\n                    ens3:\n                      dhcp4: false\n                      addresses:\n                        - 10.{n}.0.10/24\n                      routes:\n                        - to: default\n                          via: 10.{n}.0.1\n                      nameservers:\n                        addresses: [8.8.8.8, 8.8.4.4]\n"
            );
        } else {
            let _ = write!(
                y,
                "          - name: ios_config.txt\n            content: |-\n                hostname r{n}\n                !\n                no ip domain lookup\n                ip domain name lab.example\n                !\n                username cisco privilege 15 secret cisco\n                !\n"
            );
            for ifc in 0..4 {
                let _ = write!(
                    y,
                    "                interface GigabitEthernet0/{ifc}\n                 description link {ifc} of r{n}\n                 ip address 10.{n}.{ifc}.1 255.255.255.0\n                 no shutdown\n                !\n"
                );
            }
            let _ = write!(
                y,
                "                router ospf 1\n                 network 10.{n}.0.0 0.0.255.255 area 0\n                !\n                line con 0\n                 exec-timeout 0 0\n                 logging synchronous\n                line vty 0 4\n                 login local\n                 transport input ssh\n                end\n"
            );
        }
        let _ = write!(
            y,
            "      cpu_limit: null\n      cpus: null\n      data_volume: null\n      hide_links: false\n      id: n{n}\n      image_definition: null\n      label: node-{n}\n      node_definition: {}\n      parameters: {{}}\n      ram: null\n      tags:\n          - serial:${{PORT_SERIAL_{serial}}}\n",
            if vnc.is_some() { "desktop" } else { "iosv" }
        );
        if let Some(v) = vnc {
            let _ = writeln!(y, "          - vnc:${{PORT_VNC_{v}}}");
        }
        let _ = write!(
            y,
            "          - group-{}\n      x: {}\n      y: {}\n      interfaces:\n",
            n % 5,
            (n % 10) * 120,
            (n / 10) * 120
        );
        for ifc in 0..4 {
            let _ = write!(
                y,
                "          - id: i{ifc}\n            label: GigabitEthernet0/{ifc}\n            mac_address: null\n            type: physical\n            slot: {ifc}\n"
            );
        }
    }
    y.push_str("links:\n");
    for n in 1..NODES {
        let _ = write!(
            y,
            "    - id: l{n}\n      n1: n{}\n      n2: n{n}\n      i1: i1\n      i2: i0\n      conditioning: {{}}\n      label: node-{}-i1<->node-{n}-i0\n",
            n - 1,
            n - 1
        );
    }
    y.push_str("lab:\n    description: generated 50-node benchmark lab\n    notes: ''\n    title: BENCH-50\n    version: 0.3.0\n");
    (y, ports)
}

fn bench(c: &mut Criterion) {
    let (yaml, ports) = lab();
    let names: Vec<&str> = ports.iter().map(String::as_str).collect();
    let allocated: BTreeMap<String, u16> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| (p.clone(), 2000 + i as u16))
        .collect();

    // Sanity: the lab is what the doc comment says, and the rewrite takes the in-place path.
    let summary = match validate_against_ports(&yaml, &names) {
        Ok(s) => s,
        Err(e) => panic!("benchmark lab is invalid: {e}"),
    };
    assert_eq!(summary.node_count, NODES);
    assert_eq!(summary.references.len(), 99);
    match rewrite_ports_detailed(&yaml, &names, &allocated) {
        Ok(r) => assert_eq!(r.mode, RewriteMode::InPlace),
        Err(e) => panic!("benchmark rewrite failed: {e}"),
    }
    eprintln!(
        "benchmark lab: {} bytes, {} ports, {} placeholders",
        yaml.len(),
        ports.len(),
        summary.references.len()
    );

    c.bench_function("rewrite_ports 50 nodes / 99 placeholders", |b| {
        b.iter(|| rewrite_ports(black_box(&yaml), black_box(&names), black_box(&allocated)))
    });
    c.bench_function("validate_against_ports 50 nodes", |b| {
        b.iter(|| validate_against_ports(black_box(&yaml), black_box(&names)))
    });
    c.bench_function("PreparedLab::new 50 nodes", |b| {
        b.iter(|| PreparedLab::new(black_box(&yaml), black_box(&names)))
    });
    let prepared = match PreparedLab::new(&yaml, &names) {
        Ok(p) => p,
        Err(e) => panic!("benchmark lab cannot be prepared: {e}"),
    };
    assert!(prepared.splices_in_place());
    c.bench_function("PreparedLab::render 50 nodes / 99 placeholders", |b| {
        b.iter(|| prepared.render(black_box(&allocated)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
