//! The API's worker on a host's queue (the desktop app's API switch): requests run on the host's
//! one job thread, after the jobs already queued there, on the host's studio.

mod common;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::{Arc, Condvar, Mutex};

use common::*;
use loramix::api::{ApiConfig, Dispatch, Worker};
use loramix::studio::Studio;

type Queue = Arc<(Mutex<VecDeque<Box<dyn FnOnce() + Send>>>, Condvar)>;

fn post(port: u16, path: &str, body: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, out.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}

#[test]
fn api_requests_queue_behind_the_hosts_jobs() {
    // The host: one thread running whatever is queued, in order, logging what ran.
    let queue: Queue = Arc::default();
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    {
        let queue = queue.clone();
        std::thread::spawn(move || loop {
            let job = {
                let (lock, cv) = &*queue;
                let mut q = lock.lock().unwrap();
                while q.is_empty() {
                    q = cv.wait(q).unwrap();
                }
                q.pop_front().unwrap()
            };
            job();
        });
    }
    let push = {
        let queue = queue.clone();
        move |job: Box<dyn FnOnce() + Send>| {
            let (lock, cv) = &*queue;
            lock.lock().unwrap().push_back(job);
            cv.notify_one();
        }
    };
    // A long host job is running when the request arrives.
    let l = log.clone();
    push(Box::new(move || {
        std::thread::sleep(std::time::Duration::from_millis(400));
        l.lock().unwrap().push("host job".into());
    }));
    let l = log.clone();
    let dispatch: Dispatch = Arc::new(move |job| {
        let l = l.clone();
        push(Box::new(move || {
            l.lock().unwrap().push("api request".into());
            job();
        }));
        true
    });
    let model = fixture("tiny2").join("pipeline").to_string_lossy().into_owned();
    let tmp = tempfile::tempdir().unwrap();
    let config = ApiConfig { port: 0, model, library: Some(tmp.path().join("lib")), out: tmp.path().join("out"), ..Default::default() };
    let worker = Arc::new(Worker::start_on(Arc::new(Studio::new()), config.library.clone(), config.out.clone(), dispatch));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt.block_on(loramix::api::bind(&config)).unwrap();
    let port = listener.local_addr().unwrap().port();
    rt.spawn(loramix::api::serve_on(listener, config, worker, std::future::pending()));
    let (code, body) = post(port, "/sdapi/v1/txt2img", r#"{"prompt": "a red house", "steps": 2, "width": 32, "height": 32, "seed": 4}"#);
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["images"].as_array().unwrap().len(), 1);
    assert_eq!(*log.lock().unwrap(), ["host job", "api request"], "the request waited for the host's job");
}
