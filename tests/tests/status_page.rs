//! The status page in a real browser: Debian's headless Chromium, driven
//! over WebDriver by `chromedriver`, both inside the balancer's namespace,
//! loads `http://127.0.0.1:9180/` from a running daemon that balances real
//! HTTPS traffic. The page's table must equal the API's; with the read
//! token its buttons are refused with the API's words, with the admin token
//! drain, activate and weight change the daemon, and the page follows.
use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use lb_tests::{
    daemon::{Lb, TempDir},
    netns,
    topology::{API, LogOnPanic, Metrics, ServiceConf, Site, TOKEN, backends},
};
use serde_json::{Value, json};

const READ_TOKEN: &str = "status-read-token";
/// chromedriver's port inside the balancer's namespace.
const DRIVER: &str = "127.0.0.1:9515";
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// One WebDriver request from inside `ns`: the answer's `value`, or the
/// WebDriver error as text.
fn wd(ns: &str, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
    let url = format!("http://{DRIVER}{path}");
    let method = method.to_string();
    netns::within(ns, move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        let resp = match method.as_str() {
            "GET" => agent.get(&url).call(),
            "DELETE" => agent.delete(&url).call(),
            _ => agent
                .post(&url)
                .send_json(body.unwrap_or_else(|| json!({}))),
        };
        let mut resp = resp.map_err(|e| format!("{method} {url}: {e}"))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
        if status != 200 {
            return Err(format!("{method} {url}: {status} {}", v["value"]));
        }
        Ok(v["value"].clone())
    })
}

/// chromedriver and the Chromium it starts, in the balancer's namespace,
/// with a profile of their own; all killed and removed on drop, also when
/// the test panics.
struct Browser {
    ns: String,
    driver: Child,
    session: Option<String>,
    profile: TempDir,
}

impl Browser {
    fn start(ns: &str) -> Browser {
        use std::os::unix::process::CommandExt;
        let profile = TempDir::new("chromium");
        let driver = Command::new("ip")
            .args(["netns", "exec", ns, "chromedriver", "--port=9515"])
            .arg(format!(
                "--log-path={}",
                profile.path("chromedriver.log").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: Drop kills it and every Chromium
            // process it started at once.
            .process_group(0)
            .spawn()
            .expect(
                "chromedriver (Debian package chromium-driver; `cargo xtask setup` installs it)",
            );
        let mut b = Browser {
            ns: ns.to_string(),
            driver,
            session: None,
            profile,
        };
        let start = Instant::now();
        while wd(ns, "GET", "/status", None)
            .ok()
            .and_then(|v| v["ready"].as_bool())
            != Some(true)
        {
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "chromedriver not ready within 15 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let data = b.profile.path("profile");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--window-size=1440,540", "--hide-scrollbars",
                    format!("--user-data-dir={}", data.display()),
                ],
            },
        }}});
        let v = wd(ns, "POST", "/session", Some(caps)).expect("new Chromium session");
        b.session = Some(v["sessionId"].as_str().expect("session id").to_string());
        b
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let s = self.session.as_deref().expect("session");
        wd(&self.ns, method, &format!("/session/{s}{path}"), body)
    }

    fn go(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })))
            .expect("navigate");
    }

    fn find(&self, css: &str) -> String {
        let v = self
            .cmd(
                "POST",
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .unwrap_or_else(|e| panic!("find {css}: {e}"));
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("find {css}: {v}"))
            .to_string()
    }

    fn click(&self, css: &str) {
        let e = self.find(css);
        self.cmd("POST", &format!("/element/{e}/click"), None)
            .unwrap_or_else(|err| panic!("click {css}: {err}"));
    }

    /// Types `text` into the element as a user would (after clearing it).
    fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css);
        self.cmd("POST", &format!("/element/{e}/clear"), None)
            .unwrap_or_else(|err| panic!("clear {css}: {err}"));
        self.cmd(
            "POST",
            &format!("/element/{e}/value"),
            Some(json!({ "text": text })),
        )
        .unwrap_or_else(|err| panic!("type into {css}: {err}"));
    }

    fn script(&self, js: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": js, "args": []})),
        )
        .unwrap_or_else(|e| panic!("script: {e}"))
    }

    fn screenshot(&self) -> Vec<u8> {
        let v = self.cmd("GET", "/screenshot", None).expect("screenshot");
        base64_decode(v.as_str().expect("base64 PNG"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if self.session.is_some() {
            let _ = self.cmd("DELETE", "", None);
        }
        // SAFETY: kill has no memory preconditions; the group is ours.
        unsafe {
            libc::kill(-(self.driver.id() as i32), libc::SIGKILL);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        // Chromium helpers that left the group still name our profile.
        let profile = self.profile.0.display().to_string();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains(&profile) {
                    // SAFETY: as above; the process runs with our profile.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
        }
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter_map(val) {
        acc = (acc << 6) | c;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// The page's backend rows: service, address, state, health, weight,
/// last failure, slots, new flows/s and packets/s cell texts, the drawn
/// sparklines and the row's class.
const ROWS_JS: &str = r#"return Array.from(document.querySelectorAll('tr.backend')).map(tr => ({
  service: tr.dataset.service, address: tr.dataset.address,
  state: tr.querySelector('.c-state').textContent,
  health: tr.querySelector('.c-health').textContent,
  weight: tr.querySelector('.c-weight').textContent,
  error: tr.querySelector('.c-error').textContent,
  slots: tr.querySelector('.c-slots').textContent,
  packets: tr.querySelector('.c-packets .v').textContent,
  flows: tr.querySelector('.c-flows .v').textContent,
  spark: tr.querySelectorAll('svg.spark polyline').length,
  class: tr.className }));"#;

/// The rows as the API says they must look: (service, address) ->
/// (state, health, weight, last failure).
fn api_rows(lb: &Lb) -> Vec<(String, String, String, String, String, String)> {
    let (status, v) = lb.get("/api/v1/services");
    assert_eq!(status, 200, "{v}");
    let mut out = Vec::new();
    for s in v.as_array().unwrap() {
        for b in s["backends"].as_array().unwrap() {
            out.push((
                s["name"].as_str().unwrap().to_string(),
                b["address"].as_str().unwrap().to_string(),
                b["state"].as_str().unwrap().to_string(),
                if b["healthy"].as_bool().unwrap() {
                    "up".to_string()
                } else {
                    "down".to_string()
                },
                b["weight"].to_string(),
                b["last_error"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    out
}

fn page_rows(b: &Browser) -> Vec<(String, String, String, String, String, String)> {
    b.script(ROWS_JS)
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
            (
                s("service"),
                s("address"),
                s("state"),
                s("health"),
                s("weight"),
                s("error"),
            )
        })
        .collect()
}

fn page_row(b: &Browser, address: &str) -> Value {
    b.script(ROWS_JS)
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["address"] == address)
        .cloned()
        .unwrap_or(Value::Null)
}

/// Polls `f` every 100 ms until it is true, for at most `within`.
fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> Result<(), String>) {
    let start = Instant::now();
    loop {
        match f() {
            Ok(()) => return,
            Err(e) if start.elapsed() > within => panic!("{what} not within {within:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn text_of(b: &Browser, id: &str) -> String {
    b.script(&format!(
        "const e = document.getElementById('{id}'); return e.hidden ? '' : e.textContent;"
    ))
    .as_str()
    .unwrap_or("")
    .to_string()
}

#[test]
fn the_status_page_in_chromium_shows_the_apis_table_and_drains_a_backend() {
    lb_tests::require_root();
    let t0 = Instant::now();
    let site = Site::new("status-page");
    let ports = [8001u16, 8002, 8003];
    let _servers: Vec<_> = ports.iter().map(|&p| site.backend(p)).collect();
    // 8004 has no server: its checks fail, so the page shows a down row
    // with the last failure.
    let mut svc = ServiceConf::tcp(&[(8001, 100), (8002, 100), (8003, 200), (8004, 100)]);
    svc.health = Some(
        r#"{ kind = "tcp", interval = "200ms", timeout = "100ms", rise = 2, fall = 2 }"#.into(),
    );
    let config = site.config(&svc);
    let read = site.dir.secret("read_token", &format!("{READ_TOKEN}\n"));
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "token_file = ",
        &format!(
            "read_token_file = {:?}\ntoken_file = ",
            read.display().to_string()
        ),
        1,
    );
    std::fs::write(&config, text).unwrap();
    let lb = Lb::start(&site.lb_ns, &config, API, &["--reset-state"]);
    let _log = LogOnPanic(&lb);
    lb_tests::topology::wait_health(&lb, 8004, false, Duration::from_secs(10));

    // The assets need no token; the data does.
    let (status, html) = lb.tcp("GET", "/", None, None);
    assert_eq!(status, 200, "{html}");
    assert!(html.contains("<script src=\"/ui/app.js\""), "{html}");
    for path in ["/ui/app.js", "/ui/app.css"] {
        assert_eq!(lb.tcp("GET", path, None, None).0, 200, "{path}");
    }
    assert_eq!(lb.tcp("GET", "/api/v1/services", None, None).0, 401);

    // Traffic for the whole test (bounded: 45 s at most, or until told).
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let load = {
        let (tls, to, stop, served) = (site.tls.clone(), site.v4(), stop.clone(), served.clone());
        site.client.spawn(async move {
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(45) {
                if tls.get(to, "/", None).await.is_ok() {
                    served.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // Two samples with traffic between them: non-zero rates in the API.
    wait_for(
        "non-zero rates in /api/v1/stats",
        Duration::from_secs(15),
        || {
            let (_, v) = lb.get("/api/v1/stats");
            let busy = v["services"][0]["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|b| b["packets_per_second"].as_f64().unwrap_or(0.0) > 0.0)
                .count();
            (busy == 3).then_some(()).ok_or(format!("{v}"))
        },
    );

    let browser = Browser::start(&site.lb_ns);
    browser.go(&format!("http://{API}/"));
    // No token yet: the page says what it needs.
    wait_for("the page asks for a token", Duration::from_secs(10), || {
        let e = text_of(&browser, "error");
        e.contains("needs a token").then_some(()).ok_or(e)
    });
    // ... and stops asking: each refusal counts against 127.0.0.1's failed
    // authentications (10 a minute by default), so refreshing on would
    // lock out every client of this address.
    let no_token = |lb: &Lb| {
        let key = (
            "lb_api_refused_total".to_string(),
            vec![("reason".to_string(), "no_token".to_string())],
        );
        Metrics::scrape(lb).0.get(&key).copied().unwrap_or(0.0)
    };
    let refused = no_token(&lb);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        no_token(&lb),
        refused,
        "the page kept calling the API without a token"
    );

    // The read token: the table appears and equals the API's.
    browser.type_into("#token", READ_TOKEN);
    browser.click("#token-save");
    let want = api_rows(&lb);
    assert_eq!(want.len(), 4);
    wait_for(
        "the page's rows equal the API's",
        Duration::from_secs(10),
        || {
            let got = page_rows(&browser);
            (got == want)
                .then_some(())
                .ok_or(format!("page {got:?}\napi {want:?}"))
        },
    );
    let down = page_row(&browser, "127.0.0.1:8004");
    assert_eq!(down["class"], "backend down", "{down}");
    assert!(
        down["error"].as_str().unwrap().contains("refused"),
        "the last failure is shown: {down}"
    );
    let caption = browser.script(
        "return document.querySelector('table.service[data-service=\"web\"] caption').textContent;",
    );
    let caption = caption.as_str().unwrap();
    for part in ["web", "0.0.0.0:443", "tcp", "local", "keep_last", "serving"] {
        assert!(caption.contains(part), "{part} in {caption:?}");
    }
    // Slots and rates as /api/v1/stats has them; busy backends show traffic.
    wait_for(
        "slots and rates on the page",
        Duration::from_secs(10),
        || {
            let (_, stats) = lb.get("/api/v1/stats");
            let total = stats["services"][0]["table_size"].as_u64().unwrap();
            let mut sum = 0;
            for b in stats["services"][0]["backends"].as_array().unwrap() {
                let addr = b["address"].as_str().unwrap();
                let row = page_row(&browser, addr);
                let slots = b["slots"].as_u64().unwrap();
                sum += slots;
                let shown = format!("{slots} ({:.1}%)", slots as f64 * 100.0 / total as f64);
                if row["slots"] != shown.as_str() {
                    return Err(format!("{addr}: page {} api {shown}", row["slots"]));
                }
                let busy = addr != "127.0.0.1:8004";
                if busy && (row["packets"] == "0" || row["flows"] == "0" || row["spark"] != 3) {
                    return Err(format!("{addr} shows no traffic: {row}"));
                }
            }
            assert_eq!(sum, total, "every slot belongs to a backend");
            Ok(())
        },
    );

    // Drain with the read token: refused, in the API's words; nothing changes.
    browser.click("tr.backend[data-address=\"127.0.0.1:8001\"] button.drain");
    wait_for("the read token's refusal", Duration::from_secs(10), || {
        let e = text_of(&browser, "error");
        e.contains("403 the read token cannot change anything")
            .then_some(())
            .ok_or(e)
    });
    assert_eq!(backends(&lb)[&8001]["state"], "active");

    // The admin token: drain, see the API and the page follow.
    browser.type_into("#token", TOKEN);
    browser.click("#token-save");
    browser.click("tr.backend[data-address=\"127.0.0.1:8001\"] button.drain");
    wait_for("8001 draining in the API", Duration::from_secs(10), || {
        let s = backends(&lb)[&8001]["state"].clone();
        (s == "draining").then_some(()).ok_or(s.to_string())
    });
    wait_for("8001 draining on the page", Duration::from_secs(10), || {
        let row = page_row(&browser, "127.0.0.1:8001");
        (row["state"] == "draining"
            && row["class"] == "backend draining"
            && row["slots"] == "0 (0.0%)")
            .then_some(())
            .ok_or(row.to_string())
    });
    assert_eq!(text_of(&browser, "error"), "", "no error after the drain");

    // A weight through the page's input.
    browser.type_into(
        "tr.backend[data-address=\"127.0.0.1:8002\"] input.weight",
        "300",
    );
    browser.click("tr.backend[data-address=\"127.0.0.1:8002\"] button.set-weight");
    wait_for(
        "8002 weight 300 in the API and on the page",
        Duration::from_secs(10),
        || {
            let w = backends(&lb)[&8002]["weight"].clone();
            let row = page_row(&browser, "127.0.0.1:8002");
            (w == 300 && row["weight"] == "300")
                .then_some(())
                .ok_or(format!("api {w}, page {row}"))
        },
    );

    // The screenshot: a drained, a down and two busy backends.
    std::thread::sleep(Duration::from_millis(500));
    let png = browser.screenshot();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/status-page.png");
    std::fs::write(&out, &png).unwrap();

    // Activate it back.
    browser.click("tr.backend[data-address=\"127.0.0.1:8001\"] button.activate");
    wait_for(
        "8001 active again in the API and on the page",
        Duration::from_secs(10),
        || {
            let s = backends(&lb)[&8001]["state"].clone();
            let row = page_row(&browser, "127.0.0.1:8001");
            (s == "active" && row["state"] == "active" && row["class"] == "backend up")
                .then_some(())
                .ok_or(format!("api {s}, page {row}"))
        },
    );
    assert_eq!(page_rows(&browser), api_rows(&lb));

    stop.store(true, Ordering::Relaxed);
    site.client.wait(load);
    assert!(served.load(Ordering::Relaxed) > 50, "the load ran");
    eprintln!(
        "status page: {} requests served, {} bytes of screenshot at {}, {:?}",
        served.load(Ordering::Relaxed),
        png.len(),
        out.display(),
        t0.elapsed()
    );
}
