//! The watch against the API boundary: a `tower-test` mock answers the requests the client
//! makes, as kube-rs projects test (no API server runs here).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use serde_json::json;
use tokio::sync::mpsc;

use super::*;

struct Sink(mpsc::UnboundedSender<String>);

impl PeerSink for Sink {
    fn joined(&self, addr: SocketAddr) {
        let _ = self.0.send(format!("joined {addr}"));
    }
    fn departed(&self, ip: IpAddr) {
        let _ = self.0.send(format!("departed {ip}"));
    }
}

fn slice(name: &str, version: &str, endpoints: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name, "namespace": "clyde", "resourceVersion": version,
            "labels": {"kubernetes.io/service-name": "clyde-peers"},
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
    })
}

fn endpoint(ip: &str, ready: bool, terminating: bool) -> serde_json::Value {
    json!({"addresses": [ip], "conditions": {"ready": ready, "terminating": terminating}})
}

async fn next_messages(rx: &mut mpsc::UnboundedReceiver<String>, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        let m = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("a sink call").unwrap();
        out.push(m);
    }
    out.sort();
    out
}

#[tokio::test]
async fn joins_and_departures_follow_the_endpoint_slices() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (stop_tx, stop) = signal::channel(false);
    let service_ref = ServiceRef::parse("clyde/clyde-peers:30023").unwrap();
    let task = tokio::spawn(follow(client, service_ref, Sink(tx), stop));

    // The initial list: only this Service's slices, in its namespace.
    let (request, send) = handle.next_request().await.expect("the list request");
    assert_eq!(request.uri().path(), "/apis/discovery.k8s.io/v1/namespaces/clyde/endpointslices");
    let query = request.uri().query().unwrap_or_default().to_string();
    assert!(query.contains("labelSelector=kubernetes.io%2Fservice-name%3Dclyde-peers"), "{query}");
    assert!(!query.contains("watch=true"), "{query}");
    let list = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
        "metadata": {"resourceVersion": "10"},
        // A node that is not ready yet is a peer too (it becomes ready by joining).
        "items": [slice("clyde-peers-a", "9", json!([endpoint("10.0.0.1", true, false), endpoint("10.0.0.2", false, false)]))],
    });
    send.send_response(Response::new(Body::from(serde_json::to_vec(&list).unwrap())));
    assert_eq!(next_messages(&mut rx, 2).await, ["joined 10.0.0.1:30023", "joined 10.0.0.2:30023"]);

    // Then the watch, from the list's version: one node leaves, one joins, one terminates.
    let (request, send) = handle.next_request().await.expect("the watch request");
    let query = request.uri().query().unwrap_or_default().to_string();
    assert!(query.contains("watch=true") && query.contains("resourceVersion=10"), "{query}");
    let changed = slice(
        "clyde-peers-a",
        "11",
        json!([
            endpoint("10.0.0.2", true, false),
            endpoint("10.0.0.3", false, false),
            endpoint("10.0.0.4", true, true)
        ]),
    );
    let second = slice("clyde-peers-b", "12", json!([endpoint("10.0.0.5", true, false)]));
    let mut body = serde_json::to_vec(&json!({"type": "MODIFIED", "object": changed})).unwrap();
    body.push(b'\n');
    body.extend(serde_json::to_vec(&json!({"type": "ADDED", "object": second})).unwrap());
    body.push(b'\n');
    body.extend(
        serde_json::to_vec(&json!({"type": "DELETED", "object": slice("clyde-peers-b", "13", json!([]))})).unwrap(),
    );
    body.push(b'\n');
    send.send_response(Response::new(Body::from(body)));
    assert_eq!(
        next_messages(&mut rx, 4).await,
        ["departed 10.0.0.1", "departed 10.0.0.5", "joined 10.0.0.3:30023", "joined 10.0.0.5:30023"]
    );

    stop_tx.send(true).unwrap();
    task.await.unwrap();
}

#[test]
fn service_references() {
    assert_eq!(
        ServiceRef::parse("clyde/clyde-peers:30023").unwrap(),
        ServiceRef { namespace: "clyde".into(), name: "clyde-peers".into(), port: 30023 }
    );
    for bad in
        ["clyde-peers:30023", "clyde/clyde-peers", "clyde/Peers:1", "clyde/x:0", "clyde/x:99999", "../x:1", "a/b/c:1"]
    {
        assert!(ServiceRef::parse(bad).is_err(), "{bad}");
    }
}
