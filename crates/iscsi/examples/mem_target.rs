//! Serve in-memory thin volumes over iSCSI for manual testing:
//! `cargo run -p iscsi-target --example mem_target -- 127.0.0.1:3260 vol:64M ...`

#[path = "../tests/common/mod.rs"]
mod common;

fn parse_size(s: &str) -> u64 {
    let (n, mult) = match s.chars().last() {
        Some('K') => (&s[..s.len() - 1], 1 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    n.parse::<u64>().expect("size") * mult
}

fn main() {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:3260".into());
    let vols: Vec<(String, u64)> = args
        .map(|a| {
            let (n, s) = a.split_once(':').expect("name:size");
            (n.to_string(), parse_size(s))
        })
        .collect();
    let vols: Vec<(&str, u64)> = vols.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let provider = std::sync::Arc::new(common::MemProvider {
            volumes: vols
                .iter()
                .map(|(n, s)| (n.to_string(), common::MemVolume::new(n, *s)))
                .collect(),
        });
        let l = tokio::net::TcpListener::bind(&listen).await.expect("bind");
        eprintln!("serving on {}", l.local_addr().expect("addr"));
        let token = tokio_util::sync::CancellationToken::new();
        iscsi_target::serve(l, provider, iscsi_target::TargetConfig::default(), token)
            .await
            .expect("serve");
    });
}
