//! Many publishers, one event per request, at once (issue 11): concurrent POSTs to one
//! collection must reach every subscriber exactly once and in offset order, whatever the
//! delivery path batches or coalesces on the way.

mod support;

use std::collections::HashMap;

use serde_json::{json, Value};
use support::start_default;

const PUBLISHERS: u64 = 32;
const PER_PUBLISHER: u64 = 40;
const SUBSCRIBERS: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_single_event_publishers_deliver_every_event_once_in_offset_order() {
    let server = start_default().await;
    let mut subs = Vec::new();
    for i in 0..SUBSCRIBERS {
        let mut sub = server.ws().await;
        sub.send(&format!(
            r#"{{"type":"subscribe","collection":"orders","uid":"s{i}"}}"#
        ))
        .await;
        let init = sub.recv_raw().await;
        assert_eq!(init["event"], "init", "{init}");
        subs.push(sub);
    }

    // Every publisher has its own keep-alive client, so the requests really are in flight
    // together rather than queued on one connection.
    let addr = server.addr;
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        tasks.push(tokio::spawn(async move {
            let client = support::http_client();
            let mut offsets = Vec::new();
            for n in 0..PER_PUBLISHER {
                let id = p * PER_PUBLISHER + n;
                let body = json!({"collection":"orders","event":"create","data":{"id":id,"p":p}});
                let answer = support::post_with(&client, addr, "/v1/publish", &body).await;
                let offset = answer["events"][0]["offset"].as_u64().expect("offset");
                offsets.push((offset, id));
            }
            offsets
        }));
    }
    // offset -> the id published at it, from the publishers' own answers.
    let mut published: HashMap<u64, u64> = HashMap::new();
    for task in tasks {
        for (offset, id) in task.await.expect("publisher") {
            assert!(
                published.insert(offset, id).is_none(),
                "offset {offset} given twice"
            );
        }
    }
    let total = PUBLISHERS * PER_PUBLISHER;
    assert_eq!(published.len() as u64, total);
    assert_eq!(published.keys().min(), Some(&1));
    assert_eq!(published.keys().max(), Some(&total));

    for (i, sub) in subs.iter_mut().enumerate() {
        for expected in 1..=total {
            let frame: Value = sub.recv_raw().await;
            assert_eq!(frame["event"], "create", "subscriber {i}: {frame}");
            let offset = frame["position"]["offset"].as_u64().expect("offset");
            assert_eq!(
                offset, expected,
                "subscriber {i}: every offset once, in order"
            );
            let id = frame["data"][0]["id"].as_u64().expect("id");
            assert_eq!(
                Some(&id),
                published.get(&offset),
                "subscriber {i}: offset {offset} carries the item published at it"
            );
        }
        sub.expect_silence(std::time::Duration::from_millis(200))
            .await;
    }
}
