//! A tiny HTTP proxy in front of the test registry (127.0.0.1 only), one
//! request per connection, that can inject failures (503s, truncated blob
//! bodies) or demand bearer tokens from its own token endpoint.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug)]
pub enum Mode {
    /// Forward everything.
    Pass,
    /// Answer the first N blob GETs with 503.
    FailBlobs,
    /// Cut the first N blob GET bodies in half (full Content-Length announced).
    TruncateBlobs,
    /// Every blob GET: cut in half (never recovers).
    AlwaysTruncate,
    /// Require `Authorization: Bearer TOKEN`; tokens from GET /token, which
    /// requires basic auth USER:PASS.
    Bearer { token: String, user: String, pass: String },
}

pub struct Proxy {
    pub port: u16,
    stop: Arc<AtomicBool>,
    /// Faults still to inject (FailBlobs / TruncateBlobs).
    pub faults: Arc<AtomicU32>,
    /// Faults injected so far.
    pub injected: Arc<AtomicU32>,
    /// Token requests served.
    pub tokens_issued: Arc<AtomicU32>,
}

impl Proxy {
    pub fn start(upstream: u16, mode: Mode, faults: u32) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        l.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let faults = Arc::new(AtomicU32::new(faults));
        let injected = Arc::new(AtomicU32::new(0));
        let tokens_issued = Arc::new(AtomicU32::new(0));
        let (s, f, i, t) = (stop.clone(), faults.clone(), injected.clone(), tokens_issued.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, _)) => {
                        let (mode, f, i, t) = (mode.clone(), f.clone(), i.clone(), t.clone());
                        std::thread::spawn(move || {
                            let _ = handle(c, upstream, port, &mode, &f, &i, &t);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Proxy { port, stop, faults, injected, tokens_issued }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn read_head(c: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if c.read(&mut b)? == 0 {
            break;
        }
        buf.push(b[0]);
        if buf.len() > 64 << 10 {
            break;
        }
    }
    Ok(buf)
}

fn respond(c: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) -> std::io::Result<()> {
    let mut s = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    for (k, v) in headers {
        s.push_str(&format!("{k}: {v}\r\n"));
    }
    s.push_str("\r\n");
    c.write_all(s.as_bytes())?;
    c.write_all(body)?;
    c.flush()
}

fn handle(
    mut c: TcpStream,
    upstream: u16,
    my_port: u16,
    mode: &Mode,
    faults: &AtomicU32,
    injected: &AtomicU32,
    tokens: &AtomicU32,
) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    let head = read_head(&mut c)?;
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or("").to_string();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())))
        .collect();
    let header = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let is_blob_get = method == "GET" && path.contains("/blobs/sha256:");

    let take_fault = || faults.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
    let mut truncate = false;
    match mode {
        Mode::Pass => {}
        Mode::FailBlobs => {
            if is_blob_get && take_fault() {
                injected.fetch_add(1, Ordering::SeqCst);
                return respond(&mut c, "503 Service Unavailable", &[], b"injected failure");
            }
        }
        Mode::TruncateBlobs => {
            if is_blob_get && take_fault() {
                injected.fetch_add(1, Ordering::SeqCst);
                truncate = true;
            }
        }
        Mode::AlwaysTruncate => {
            if is_blob_get {
                injected.fetch_add(1, Ordering::SeqCst);
                truncate = true;
            }
        }
        Mode::Bearer { token, user, pass } => {
            if path.starts_with("/token") {
                let want = format!("Basic {}", base64(format!("{user}:{pass}").as_bytes()));
                if header("authorization").as_deref() != Some(want.as_str()) {
                    return respond(&mut c, "401 Unauthorized", &[], br#"{"details":"bad credentials"}"#);
                }
                tokens.fetch_add(1, Ordering::SeqCst);
                let body = format!(r#"{{"token":"{token}","access_token":"{token}","expires_in":300}}"#);
                return respond(&mut c, "200 OK", &[("Content-Type", "application/json".into())], body.as_bytes());
            }
            if header("authorization").as_deref() != Some(format!("Bearer {token}").as_str()) {
                let challenge = format!(r#"Bearer realm="http://127.0.0.1:{my_port}/token",service="sm-oci-test""#);
                return respond(
                    &mut c,
                    "401 Unauthorized",
                    &[("WWW-Authenticate", challenge), ("Content-Type", "application/json".into())],
                    br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
                );
            }
        }
    }

    // Forward, one request per connection.
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    let mut req = format!("{request_line}\r\n");
    for (k, v) in &headers {
        if k == "connection" || k == "authorization" || k == "keep-alive" {
            continue;
        }
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("Connection: close\r\n\r\n");
    up.write_all(req.as_bytes())?;
    let mut resp = Vec::new();
    up.read_to_end(&mut resp)?;
    if truncate {
        if let Some(pos) = resp.windows(4).position(|w| w == b"\r\n\r\n") {
            let body_len = resp.len() - (pos + 4);
            resp.truncate(pos + 4 + body_len / 2);
        }
    }
    c.write_all(&resp)?;
    c.flush()?;
    let _ = c.shutdown(std::net::Shutdown::Both);
    Ok(())
}

pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 { T[(n >> 6) as usize & 63] as char } else { '=' });
        out.push(if chunk.len() > 2 { T[n as usize & 63] as char } else { '=' });
    }
    out
}
