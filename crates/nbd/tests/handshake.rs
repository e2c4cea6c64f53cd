//! Option haggling, checked byte by byte with a raw client.

mod common;

use std::time::{Duration, Instant};

use common::*;
use nbd_server::ServerConfig;
use nbd_server::proto::*;

const VOL_SIZE: u64 = 1 << 20;

async fn server() -> TestServer {
    TestServer::start(
        vec![
            MemVolume::new("vol", VOL_SIZE),
            MemVolume::new("alpha", 2 * VOL_SIZE),
        ],
        ServerConfig::default(),
    )
    .await
}

async fn fixed_newstyle(srv: &TestServer) -> RawClient {
    let (mut c, _) = RawClient::connect(srv.addr).await;
    c.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .await;
    c
}

/// Send GO for `export` and check it ends in ACK.
async fn go_succeeds(c: &mut RawClient, export: &str) {
    c.send_option(OPT_GO, &info_request(export, &[])).await;
    let replies = c.read_option_replies().await;
    let last = replies.last().map(|r| r.reply);
    assert_eq!(last, Some(REP_ACK), "GO {export:?} failed: {replies:?}");
}

fn names_of(replies: &[OptReply]) -> Vec<String> {
    replies
        .iter()
        .filter(|r| r.reply == REP_SERVER)
        .map(|r| {
            let n = u32::from_be_bytes(r.data[0..4].try_into().expect("4")) as usize;
            String::from_utf8(r.data[4..4 + n].to_vec()).expect("utf-8 name")
        })
        .collect()
}

#[tokio::test]
async fn greeting_advertises_fixed_newstyle_and_no_zeroes() {
    let srv = server().await;
    let (_c, flags) = RawClient::connect(srv.addr).await;
    assert_eq!(
        flags,
        FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
        "handshake flags"
    );
    srv.stop().await;
}

#[tokio::test]
async fn unknown_option_gets_err_unsup_and_the_session_goes_on() {
    let srv = server().await;
    let mut c = fixed_newstyle(&srv).await;
    for option in [OPT_STARTTLS, OPT_EXTENDED_HEADERS, 4, 0xdead_beef] {
        c.send_option(option, b"some data").await;
        let r = c.read_option_reply().await;
        assert_eq!(r.option, option, "reply must name the option");
        assert_eq!(
            r.reply, REP_ERR_UNSUP,
            "option {option} must be unsupported"
        );
    }
    c.send_option(OPT_LIST, &[]).await;
    let replies = c.read_option_replies().await;
    assert_eq!(
        names_of(&replies),
        vec!["alpha", "vol"],
        "LIST after errors"
    );
    srv.stop().await;
}

#[tokio::test]
async fn list_names_every_volume_and_rejects_data() {
    let srv = server().await;
    let mut c = fixed_newstyle(&srv).await;
    c.send_option(OPT_LIST, &[]).await;
    let replies = c.read_option_replies().await;
    assert_eq!(names_of(&replies), vec!["alpha", "vol"]);
    assert_eq!(replies.last().map(|r| r.reply), Some(REP_ACK));
    c.send_option(OPT_LIST, b"x").await;
    assert_eq!(
        c.read_option_reply().await.reply,
        REP_ERR_INVALID,
        "LIST with data"
    );
    srv.stop().await;
}

#[tokio::test]
async fn info_reports_size_flags_and_block_sizes_then_go_enters_transmission() {
    let srv = server().await;
    let mut c = fixed_newstyle(&srv).await;
    c.send_option(
        OPT_INFO,
        &info_request("alpha", &[INFO_BLOCK_SIZE, INFO_NAME]),
    )
    .await;
    let replies = c.read_option_replies().await;
    assert_eq!(
        replies.last().map(|r| r.reply),
        Some(REP_ACK),
        "INFO failed: {replies:?}"
    );
    let info = |ty: u16| {
        replies
            .iter()
            .find(|r| r.reply == REP_INFO && r.data[0..2] == ty.to_be_bytes())
            .unwrap_or_else(|| panic!("no NBD_INFO type {ty} in {replies:?}"))
            .data
            .clone()
    };
    let export = info(INFO_EXPORT);
    assert_eq!(export.len(), 12, "NBD_INFO_EXPORT is 12 bytes");
    assert_eq!(
        u64::from_be_bytes(export[2..10].try_into().expect("8")),
        2 * VOL_SIZE
    );
    let flags = u16::from_be_bytes([export[10], export[11]]);
    for (flag, name) in [
        (FLAG_HAS_FLAGS, "HAS_FLAGS"),
        (FLAG_SEND_FLUSH, "SEND_FLUSH"),
        (FLAG_SEND_FUA, "SEND_FUA"),
        (FLAG_SEND_TRIM, "SEND_TRIM"),
        (FLAG_SEND_WRITE_ZEROES, "SEND_WRITE_ZEROES"),
        (FLAG_SEND_FAST_ZERO, "SEND_FAST_ZERO"),
        (FLAG_SEND_CACHE, "SEND_CACHE"),
        (FLAG_CAN_MULTI_CONN, "CAN_MULTI_CONN"),
    ] {
        assert_ne!(flags & flag, 0, "transmission flag {name} missing");
    }
    assert_eq!(
        flags & FLAG_SEND_DF,
        0,
        "DF advertised without structured replies"
    );
    assert_eq!(flags & FLAG_READ_ONLY, 0, "export must be writable");
    let sizes = info(INFO_BLOCK_SIZE);
    assert_eq!(sizes.len(), 14);
    let word = |i: usize| u32::from_be_bytes(sizes[i..i + 4].try_into().expect("4"));
    assert_eq!(
        (word(2), word(6), word(10)),
        (1, 4096, 32 << 20),
        "min/preferred/max"
    );
    assert_eq!(&info(INFO_NAME)[2..], b"alpha", "canonical name");

    // INFO leaves the session in negotiation: GO still works.
    go_succeeds(&mut c, "alpha").await;
    c.request(0, CMD_READ, 1, 0, 512).await;
    let r = c.read_reply(|_| 512).await;
    assert_eq!(r, Reply::ok(1, vec![0; 512]), "read after GO");
    srv.stop().await;
}

#[tokio::test]
async fn go_to_an_unknown_export_gets_err_unknown_and_the_session_goes_on() {
    let srv = server().await;
    let mut c = fixed_newstyle(&srv).await;
    for option in [OPT_INFO, OPT_GO] {
        c.send_option(option, &info_request("nope", &[])).await;
        let replies = c.read_option_replies().await;
        assert_eq!(
            replies.len(),
            1,
            "no NBD_REP_INFO before the error: {replies:?}"
        );
        assert_eq!(replies[0].reply, REP_ERR_UNKNOWN);
        assert!(
            String::from_utf8_lossy(&replies[0].data).contains("nope"),
            "message names it"
        );
    }
    go_succeeds(&mut c, "vol").await;
    srv.stop().await;
}

#[tokio::test]
async fn empty_name_is_the_default_export_only_with_one_volume() {
    let two = server().await;
    let mut c = fixed_newstyle(&two).await;
    c.send_option(OPT_GO, &info_request("", &[])).await;
    assert_eq!(
        c.read_option_reply().await.reply,
        REP_ERR_UNKNOWN,
        "ambiguous default"
    );
    two.stop().await;

    let one = TestServer::start(vec![MemVolume::new("only", VOL_SIZE)], Default::default()).await;
    let (_c, session) = RawClient::open(one.addr, "", false, false).await;
    assert_eq!(session.size, VOL_SIZE, "default export is the only volume");
    one.stop().await;
}

#[tokio::test]
async fn malformed_go_data_is_invalid_and_the_session_goes_on() {
    let srv = server().await;
    let mut c = fixed_newstyle(&srv).await;
    let mut bad = info_request("vol", &[INFO_NAME]);
    bad[3] = 200; // name length past the data
    for data in [
        bad,
        vec![0, 0],
        info_request("vol", &[]).into_iter().chain([9]).collect(),
    ] {
        c.send_option(OPT_GO, &data).await;
        assert_eq!(
            c.read_option_reply().await.reply,
            REP_ERR_INVALID,
            "data {data:?}"
        );
    }
    go_succeeds(&mut c, "vol").await;
    srv.stop().await;
}

#[tokio::test]
async fn export_name_enters_transmission_with_or_without_zero_padding() {
    let srv = server().await;
    for no_zeroes in [false, true] {
        let (mut c, _) = RawClient::connect(srv.addr).await;
        let flags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
        c.send(&flags.to_be_bytes()).await;
        c.send_option(OPT_EXPORT_NAME, b"vol").await;
        let mut reply = vec![0u8; if no_zeroes { 10 } else { 134 }];
        tokio::io::AsyncReadExt::read_exact(&mut c.rd, &mut reply)
            .await
            .expect("export reply");
        assert_eq!(
            u64::from_be_bytes(reply[0..8].try_into().expect("8")),
            VOL_SIZE
        );
        assert_ne!(u16::from_be_bytes([reply[8], reply[9]]) & FLAG_HAS_FLAGS, 0);
        assert!(reply[10..].iter().all(|&b| b == 0), "padding must be zeros");
        c.write(0, 7, 4096, b"hello").await;
        assert_eq!(
            reply_errno(&c.read_reply(|_| 0).await),
            0,
            "write after EXPORT_NAME"
        );
        c.request(0, CMD_READ, 8, 4096, 5).await;
        let r = c.read_reply(|_| 5).await;
        assert_eq!(r, Reply::ok(8, b"hello".to_vec()));
    }
    srv.stop().await;
}

#[tokio::test]
async fn export_name_of_an_unknown_export_closes_the_connection() {
    let srv = server().await;
    let mut c = fixed_newstyle(&srv).await;
    c.send_option(OPT_EXPORT_NAME, b"nope").await;
    assert!(
        c.closed_by_server().await,
        "EXPORT_NAME cannot fail softly: must disconnect"
    );
    assert_eq!(srv.server.stats().snapshot().handshakes_failed_total, 1);
    srv.stop().await;
}

#[tokio::test]
async fn abort_is_acknowledged_and_the_connection_closed() {
    let srv = server().await;
    let mut c = fixed_newstyle(&srv).await;
    c.send_option(OPT_ABORT, &[]).await;
    let r = c.read_option_reply().await;
    assert_eq!((r.option, r.reply), (OPT_ABORT, REP_ACK));
    assert!(c.closed_by_server().await, "server must close after ABORT");
    srv.stop().await;
}

#[tokio::test]
async fn unknown_client_flags_or_bad_option_magic_close_the_connection() {
    let srv = server().await;
    let (mut c, _) = RawClient::connect(srv.addr).await;
    c.send(&(FLAG_C_FIXED_NEWSTYLE | 1 << 7).to_be_bytes())
        .await;
    assert!(
        c.closed_by_server().await,
        "unknown client flag must disconnect"
    );

    let mut c = fixed_newstyle(&srv).await;
    c.send(b"NOTMAGIC\0\0\0\x03\0\0\0\0").await;
    assert!(
        c.closed_by_server().await,
        "bad option magic must disconnect"
    );
    srv.stop().await;
}

#[tokio::test]
async fn oversized_option_data_gets_err_too_big_and_the_session_goes_on() {
    let srv = server().await;
    let mut c = fixed_newstyle(&srv).await;
    c.send_option(OPT_GO, &vec![0u8; 1 << 20]).await;
    assert_eq!(c.read_option_reply().await.reply, REP_ERR_TOO_BIG);
    go_succeeds(&mut c, "vol").await;
    srv.stop().await;
}

#[tokio::test]
async fn meta_contexts_need_structured_replies() {
    let srv = server().await;
    let mut c = fixed_newstyle(&srv).await;
    for option in [OPT_SET_META_CONTEXT, OPT_LIST_META_CONTEXT] {
        c.send_option(
            option,
            &meta_context_request("vol", &[CONTEXT_BASE_ALLOCATION]),
        )
        .await;
        assert_eq!(
            c.read_option_reply().await.reply,
            REP_ERR_INVALID,
            "option {option}"
        );
    }
    srv.stop().await;
}

#[tokio::test]
async fn list_meta_context_answers_wildcards_and_ignores_unknown_namespaces() {
    let srv = server().await;
    let mut c = fixed_newstyle(&srv).await;
    c.send_option(OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(c.read_option_reply().await.reply, REP_ACK);
    for (queries, expect) in [
        (vec![], true),
        (vec!["base:"], true),
        (vec!["base:allocation"], true),
        (vec!["qemu:dirty-bitmap:x", "base:nothing"], false),
    ] {
        c.send_option(
            OPT_LIST_META_CONTEXT,
            &meta_context_request("vol", &queries),
        )
        .await;
        let replies = c.read_option_replies().await;
        assert_eq!(
            replies.last().map(|r| r.reply),
            Some(REP_ACK),
            "{queries:?}: {replies:?}"
        );
        let contexts: Vec<_> = replies
            .iter()
            .filter(|r| r.reply == REP_META_CONTEXT)
            .map(|r| String::from_utf8_lossy(&r.data[4..]).into_owned())
            .collect();
        let want: Vec<String> = if expect {
            vec![CONTEXT_BASE_ALLOCATION.into()]
        } else {
            vec![]
        };
        assert_eq!(contexts, want, "contexts listed for {queries:?}");
    }
    c.send_option(OPT_LIST_META_CONTEXT, &meta_context_request("nope", &[]))
        .await;
    assert_eq!(
        c.read_option_reply().await.reply,
        REP_ERR_UNKNOWN,
        "unknown export"
    );
    srv.stop().await;
}

#[tokio::test]
async fn block_status_needs_a_context_selected_for_the_same_export() {
    let srv = server().await;
    let (mut c, _) = RawClient::connect(srv.addr).await;
    c.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .await;
    c.send_option(OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(c.read_option_reply().await.reply, REP_ACK);
    c.send_option(
        OPT_SET_META_CONTEXT,
        &meta_context_request("alpha", &[CONTEXT_BASE_ALLOCATION]),
    )
    .await;
    let replies = c.read_option_replies().await;
    assert_eq!(replies.len(), 2, "context then ACK: {replies:?}");
    let id = u32::from_be_bytes(replies[0].data[0..4].try_into().expect("4"));
    assert_ne!(id, 0, "selected context gets an id");
    c.send_option(OPT_GO, &info_request("vol", &[])).await;
    let replies = c.read_option_replies().await;
    assert_eq!(replies.last().map(|r| r.reply), Some(REP_ACK));
    c.request(0, CMD_BLOCK_STATUS, 5, 0, 4096).await;
    let chunks = c.read_chunks().await;
    assert_eq!(
        reply_errno(&chunks[0]),
        EINVAL,
        "context was for another export"
    );
    srv.stop().await;
}

#[tokio::test]
async fn a_stalled_handshake_is_dropped_after_the_timeout() {
    let cfg = ServerConfig {
        handshake_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let srv = TestServer::start(vec![MemVolume::new("vol", VOL_SIZE)], cfg).await;
    let start = Instant::now();
    let (mut c, _) = RawClient::connect(srv.addr).await;
    // Send half the client flags, then nothing.
    c.send(&[0, 0]).await;
    assert!(
        c.closed_by_server().await,
        "stalled handshake must be dropped"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "dropped only after {:?}",
        start.elapsed()
    );

    let mut c = fixed_newstyle(&srv).await;
    c.send(&IHAVEOPT.to_be_bytes()).await; // an option header cut short
    assert!(c.closed_by_server().await, "stalled option must be dropped");
    assert_eq!(srv.server.stats().snapshot().handshakes_failed_total, 2);
    srv.stop().await;
}
