//! `pshard serve` through a real HTTP client on a loopback port (SmolLM2 on the CPU): chat and
//! completions streamed and not, greedy results equal to `pshard run --temp 0` under concurrency,
//! bad input answered 4xx while the server keeps serving, the queue's 429, disconnects freeing
//! their sequence, a bounded load test, and the drain on SIGTERM.

mod serving;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use serving::{metric, pshard, Server};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}

async fn post(c: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    let r = c.post(url).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// The `data:` payloads of an SSE response, in order.
async fn sse(r: reqwest::Response) -> Vec<String> {
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = r.text().await.unwrap();
    text.split("\n\n")
        .filter_map(|ev| ev.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(str::to_string)
        .collect()
}

async fn metrics(c: &reqwest::Client, base: &str) -> String {
    c.get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Polls /metrics until `name` reaches `want` (or fails after 20 s).
async fn wait_metric(c: &reqwest::Client, base: &str, name: &str, want: f64) {
    let t0 = Instant::now();
    loop {
        let m = metrics(c, base).await;
        if metric(&m, name) == want {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{name} never reached {want}:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_completions_streamed_and_not() {
    let Some(model) = serving::model() else {
        return;
    };
    let s = Server::start(&model, &["--parallel", "2"]);
    assert!(
        s.log()
            .iter()
            .any(|l| l.contains("tier") && l.contains("ALL_CPU")),
        "startup prints the plan: {:?}",
        s.log()
    );
    let c = client();
    let base = &s.base;
    let msgs = json!([{"role": "user", "content": "Name three colours."}]);
    let (st, v) = post(
        &c,
        format!("{base}/v1/chat/completions"),
        json!({"model": "SmolLM2-135M-Instruct.Q4_1", "messages": msgs, "temperature": 0, "max_tokens": 12}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!text.is_empty());
    let usage = &v["usage"];
    let prompt_tokens = usage["prompt_tokens"].as_u64().unwrap();
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=12).contains(&completion), "{v}");
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        prompt_tokens + completion
    );
    let fr = v["choices"][0]["finish_reason"].as_str().unwrap();
    assert_eq!(fr == "length", completion == 12, "{v}");

    // The same request streamed: role first, the same text in pieces, the finish, the usage, [DONE].
    let r = c
        .post(format!("{base}/v1/chat/completions"))
        .json(
            &json!({"messages": msgs, "temperature": 0, "max_tokens": 12, "stream": true,
                      "stream_options": {"include_usage": true}}),
        )
        .send()
        .await
        .unwrap();
    let events = sse(r).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text);
    let fin = &chunks[chunks.len() - 2];
    assert_eq!(fin["choices"][0]["finish_reason"], fr);
    let u = &chunks[chunks.len() - 1];
    assert_eq!(u["choices"], json!([]));
    assert_eq!(
        u["usage"]["completion_tokens"].as_u64().unwrap(),
        completion
    );
    // The second time, the prompt came from a slot's cache (all but its last token).
    assert_eq!(
        u["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap(),
        prompt_tokens - 1
    );

    // A stop string cuts the text before it and ends with "stop".
    let cut = text.char_indices().nth(text.chars().count() / 2).unwrap().0;
    let stop = text[cut..].chars().take(3).collect::<String>();
    if !text[..cut].contains(&stop) {
        let (_, v) = post(
            &c,
            format!("{base}/v1/chat/completions"),
            json!({"messages": msgs, "temperature": 0, "max_tokens": 12, "stop": [stop]}),
        )
        .await;
        assert_eq!(v["choices"][0]["message"]["content"], text[..cut], "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }

    // Completions, streamed and not, agree.
    let body = json!({"prompt": "The capital of France is", "temperature": 0, "max_tokens": 6});
    let (st, v) = post(&c, format!("{base}/v1/completions"), body.clone()).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    let whole = v["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(whole.starts_with(" Paris"), "{v}");
    let mut b = body.clone();
    b["stream"] = json!(true);
    let events = sse(c
        .post(format!("{base}/v1/completions"))
        .json(&b)
        .send()
        .await
        .unwrap())
    .await;
    let pieces: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(pieces, whole);

    // The other endpoints.
    let v: Value = c
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"][0]["id"], "SmolLM2-135M-Instruct.Q4_1");
    let (_, v) = post(
        &c,
        format!("{base}/tokenize"),
        json!({"content": "Hello world"}),
    )
    .await;
    let toks = v["tokens"].clone();
    assert!(toks.as_array().unwrap().len() >= 2, "{v}");
    let (_, v) = post(&c, format!("{base}/detokenize"), json!({"tokens": toks})).await;
    assert_eq!(v["content"], "Hello world");
    let m = metrics(&c, base).await;
    assert_eq!(metric(&m, "pshard_requests_total"), 5.0, "{m}");
    assert!(metric(&m, "pshard_generated_tokens_total") >= 12.0, "{m}");
    assert_eq!(metric(&m, "pshard_busy_sequences"), 0.0);
    assert_eq!(metric(&m, "pshard_sequences"), 2.0);
    assert!(
        m.contains("pshard_http_responses_total{route=\"/v1/chat/completions\",status=\"200\"}"),
        "{m}"
    );
}

/// `pshard run --temp 0`'s text for a prompt (chat-templated or not).
/// `pshard run --temp 0` of `n` tokens (context 512 unless `extra` gives `-c`): its text.
fn run_text(model: &std::path::Path, prompt: &str, chat: bool, n: usize, extra: &[&str]) -> String {
    let mut cmd = pshard();
    cmd.args(["run", "--device", "cpu", "-t", "1"]);
    if !extra.contains(&"-c") {
        cmd.args(["-c", "512"]);
    }
    cmd.args(extra)
        .args(["--temp", "0", "--no-display-prompt", "-n"])
        .arg(n.to_string())
        .arg("-m")
        .arg(model)
        .args(["-p", prompt]);
    if chat {
        cmd.arg("--chat");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8(out.stdout).unwrap();
    s.strip_suffix('\n').unwrap_or(&s).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_greedy_requests_match_pshard_run() {
    let Some(model) = serving::model() else {
        return;
    };
    let prompts = [
        ("What is the capital of France?", true),
        ("Write a haiku about the sea.", true),
        ("List three prime numbers.", true),
        ("Why is the sky blue?", true),
        ("The capital of France is", false),
        ("Once upon a time", false),
        ("def fibonacci(n):", false),
        ("1, 2, 3, 4,", false),
    ];
    let n = 16;
    let want: Vec<String> = prompts
        .iter()
        .map(|(p, chat)| run_text(&model, p, *chat, n, &[]))
        .collect();
    // Four sequences for eight requests: prompts join batches of running decodes, requests wait.
    // Evaluations of at most 16 tokens: prompts are cut into chunks (some carrying no row whose
    // logits are wanted) and mixed with other sequences' decode rows.
    let s = Server::start(&model, &["--parallel", "4", "-u", "16"]);
    let c = client();
    let tasks: Vec<_> = prompts
        .iter()
        .map(|&(p, chat)| {
            let c = c.clone();
            let base = s.base.clone();
            tokio::spawn(async move {
                let (url, body) = if chat {
                    (format!("{base}/v1/chat/completions"), json!({"messages": [{"role": "user", "content": p}], "temperature": 0, "max_tokens": n}))
                } else {
                    (format!("{base}/v1/completions"), json!({"prompt": p, "temperature": 0, "max_tokens": n}))
                };
                let (st, v) = post(&c, url, body).await;
                assert_eq!(st, 200, "{v}");
                let ch = &v["choices"][0];
                ch["message"]["content"].as_str().or(ch["text"].as_str()).unwrap().to_string()
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let got = t.await.unwrap();
        assert_eq!(got, want[i], "prompt {:?}", prompts[i].0);
    }
    let m = metrics(&c, &s.base).await;
    // Batches did carry several sequences: fewer evaluations than tokens.
    let evals = metric(&m, "pshard_evaluations_total");
    let toks = metric(&m, "pshard_generated_tokens_total");
    assert!(evals < toks, "{m}");
}

/// `--context-shift`: a reply longer than the context goes on (the same tokens as `pshard run
/// --context-shift` with the same --keep), and a prompt longer than the context is cut instead of
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_shift_goes_on_past_the_context_as_pshard_run_does() {
    let Some(model) = serving::model() else {
        return;
    };
    let prompt = "Once upon a time";
    let want = run_text(
        &model,
        prompt,
        false,
        100,
        &["-c", "64", "--context-shift", "--keep", "4"],
    );
    let s = Server::start_ctx(
        &model,
        64,
        &["--parallel", "1", "--context-shift", "--keep", "4"],
    );
    let c = client();
    let complete = |prompt: String, n: usize| {
        let (c, url) = (c.clone(), format!("{}/v1/completions", s.base));
        async move {
            let (st, v) = post(
                &c,
                url,
                json!({"prompt": prompt, "temperature": 0, "max_tokens": n}),
            )
            .await;
            assert_eq!(st, 200, "{v}");
            v
        }
    };
    let v = complete(prompt.to_string(), 100).await;
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), want);
    // 100 tokens after a prompt of a few in a context of 64: shifted at least once.
    assert_eq!(v["usage"]["completion_tokens"], 100, "{v}");
    let m = metrics(&c, &s.base).await;
    assert!(metric(&m, "pshard_context_shifts_total") >= 1.0, "{m}");
    let v = complete("word ".repeat(100), 4).await;
    assert_eq!(v["usage"]["completion_tokens"], 4, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_answered_4xx_and_the_server_keeps_serving() {
    let Some(model) = serving::model() else {
        return;
    };
    let s = Server::start(
        &model,
        &[
            "--parallel",
            "1",
            "--queue",
            "1",
            "--api-key",
            "sekret",
            "--max-tokens",
            "64",
            "--max-body-bytes",
            "65536",
        ],
    );
    let base = &s.base;
    let c = client();
    let chat = format!("{base}/v1/chat/completions");
    let user = json!([{"role": "user", "content": "hi"}]);
    let good = json!({"messages": user, "temperature": 0, "max_tokens": 2});
    let long = "word ".repeat(600);
    // (method, url, body, status, the field the error names)
    type Case<'a> = (&'a str, String, Option<String>, u16, Option<&'a str>);
    let cases: Vec<Case> = vec![
        ("POST", chat.clone(), Some("{not json".into()), 400, None),
        ("POST", chat.clone(), Some("[1,2]".into()), 400, None),
        ("POST", chat.clone(), Some(json!({"messages": "hi"}).to_string()), 400, Some("messages")),
        ("POST", chat.clone(), Some(json!({}).to_string()), 400, Some("messages")),
        ("POST", chat.clone(), Some(json!({"messages": [{"role": "wizard", "content": "x"}]}).to_string()), 400, Some("messages[0].role")),
        ("POST", chat.clone(), Some(json!({"messages": user, "temperature": "hot"}).to_string()), 400, Some("temperature")),
        ("POST", chat.clone(), Some(json!({"messages": user, "max_tokens": -1}).to_string()), 400, Some("max_tokens")),
        ("POST", chat.clone(), Some(json!({"messages": user, "max_tokens": 65}).to_string()), 400, Some("max_tokens")),
        ("POST", chat.clone(), Some(json!({"messages": user, "n": 2}).to_string()), 400, Some("n")),
        ("POST", chat.clone(), Some(json!({"messages": user, "tools": [{"type": "function", "function": {"name": "f"}}]}).to_string()), 400, Some("tools")),
        ("POST", chat.clone(), Some(json!({"messages": user, "model": "gpt-4"}).to_string()), 400, Some("model")),
        ("POST", chat.clone(), Some(json!({"messages": user, "stop": [1]}).to_string()), 400, Some("stop")),
        ("POST", chat.clone(), Some(json!({"messages": [{"role": "user", "content": long}]}).to_string()), 400, Some("messages")),
        ("POST", chat.clone(), Some(format!("{{\"messages\": \"{}\"}}", "x".repeat(70000))), 413, None),
        ("POST", format!("{base}/v1/completions"), Some(json!({"prompt": [1, 2, 99999999]}).to_string()), 400, Some("prompt[2]")),
        ("POST", format!("{base}/v1/completions"), Some(json!({"prompt": ["a", "b"]}).to_string()), 400, Some("prompt")),
        ("POST", format!("{base}/v1/completions"), Some(json!({"prompt": ""}).to_string()), 400, Some("prompt")),
        ("POST", format!("{base}/detokenize"), Some(json!({"tokens": [-1]}).to_string()), 400, Some("tokens[0]")),
        ("POST", format!("{base}/tokenize"), Some(json!({"content": 5}).to_string()), 400, Some("content")),
        ("GET", chat.clone(), None, 405, None),
        ("GET", format!("{base}/v2/nothing"), None, 404, None),
    ];
    for (method, url, body, want, param) in &cases {
        let mut rq = c
            .request(method.parse().unwrap(), url)
            .bearer_auth("sekret");
        if let Some(b) = body {
            rq = rq
                .header("content-type", "application/json")
                .body(b.clone());
        }
        let r = rq.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert_eq!(
            status,
            *want,
            "{method} {url} {:?}: {text}",
            body.as_deref().map(|b| &b[..b.len().min(80)])
        );
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not an error object: {text}"));
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{text}"
        );
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], *p, "{text}");
        }
        // Still serving.
        let r = c
            .post(&chat)
            .bearer_auth("sekret")
            .json(&good)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // No key, a wrong key: 401 (health stays open).
    let r = c.post(&chat).json(&good).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .post(&chat)
        .bearer_auth("wrong")
        .json(&good)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        c.get(format!("{base}/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // One sequence, one place in the queue: a third request gets 429 with Retry-After.
    let running = c
        .post(&chat)
        .bearer_auth("sekret")
        .json(&json!({"messages": user, "max_tokens": 64, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    let mut running = running.bytes_stream();
    running.next().await.unwrap().unwrap();
    let c2 = c.clone();
    let chat2 = chat.clone();
    let good2 = good.clone();
    let queued = tokio::spawn(async move {
        c2.post(chat2)
            .bearer_auth("sekret")
            .json(&good2)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    });
    let t0 = Instant::now();
    loop {
        let m = c
            .get(format!("{base}/metrics"))
            .bearer_auth("sekret")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if metric(&m, "pshard_queue_depth") == 1.0 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{m}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = c
        .post(&chat)
        .bearer_auth("sekret")
        .json(&good)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    drop(running);
    assert_eq!(queued.await.unwrap(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_frees_the_sequence() {
    let Some(model) = serving::model() else {
        return;
    };
    let s = Server::start(&model, &["--parallel", "2"]);
    let base = &s.base;
    let c = client();
    let long =
        json!({"prompt": "Count: 1, 2, 3,", "max_tokens": 400, "ignore_eos": true, "stream": true});
    // Streamed: the client reads two chunks and goes.
    let r = c
        .post(format!("{base}/v1/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    let mut st = r.bytes_stream();
    st.next().await.unwrap().unwrap();
    st.next().await.unwrap().unwrap();
    wait_metric(&c, base, "pshard_busy_sequences", 1.0).await;
    drop(st);
    wait_metric(&c, base, "pshard_busy_sequences", 0.0).await;
    wait_metric(&c, base, "pshard_requests_cancelled_total", 1.0).await;
    let m = metrics(&c, base).await;
    let generated = metric(&m, "pshard_generated_tokens_total");
    assert!(generated < 400.0, "{m}");
    // Not streamed: the connection closes while the answer is being generated.
    let mut body = long.clone();
    body["stream"] = json!(false);
    let text = body.to_string();
    let addr = base.trim_start_matches("http://").to_string();
    {
        use tokio::io::AsyncWriteExt;
        let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let req = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        );
        sock.write_all(req.as_bytes()).await.unwrap();
        wait_metric(&c, base, "pshard_busy_sequences", 1.0).await;
    }
    wait_metric(&c, base, "pshard_busy_sequences", 0.0).await;
    wait_metric(&c, base, "pshard_requests_cancelled_total", 2.0).await;
    let m = metrics(&c, base).await;
    assert!(
        metric(&m, "pshard_generated_tokens_total") < generated + 400.0,
        "{m}"
    );
    // The freed sequences serve the next requests.
    let (st, _) = post(
        &c,
        format!("{base}/v1/completions"),
        json!({"prompt": "Hi", "max_tokens": 2}),
    )
    .await;
    assert_eq!(st, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_200_requests_over_16_connections_loses_none() {
    let Some(model) = serving::model() else {
        return;
    };
    let s = Server::start(&model, &["--parallel", "8", "--queue", "64"]);
    let total = 200;
    let conns = 16;
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|k| {
            let base = s.base.clone();
            tokio::spawn(async move {
                // One connection per task (a client of its own, kept alive between requests).
                let c = reqwest::Client::builder()
                    .pool_max_idle_per_host(1)
                    .timeout(Duration::from_secs(300))
                    .build()
                    .unwrap();
                let mut lat = Vec::new();
                for i in (k..total).step_by(conns) {
                    let t = Instant::now();
                    let (st, v) = post(
                        &c,
                        format!("{base}/v1/completions"),
                        json!({"prompt": format!("Request {i}: the number after {i} is"), "max_tokens": 3, "temperature": 0}),
                    )
                    .await;
                    assert_eq!(st, 200, "{v}");
                    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() >= 1, "{v}");
                    lat.push(t.elapsed().as_secs_f64());
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let wall = t0.elapsed().as_secs_f64();
    assert_eq!(lat.len(), total);
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1];
    eprintln!(
        "load: {total} requests over {conns} connections in {wall:.2} s: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        pct(0.5) * 1e3,
        pct(0.99) * 1e3,
        lat[lat.len() - 1] * 1e3
    );
    let m = metrics(&client(), &s.base).await;
    assert_eq!(metric(&m, "pshard_requests_total"), total as f64, "{m}");
    assert_eq!(
        metric(&m, "pshard_requests_finished_total"),
        total as f64,
        "{m}"
    );
    assert_eq!(metric(&m, "pshard_requests_cancelled_total"), 0.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_requests_in_flight() {
    let Some(model) = serving::model() else {
        return;
    };
    let mut s = Server::start(&model, &["--parallel", "1", "--drain-timeout", "60"]);
    let c = client();
    let r = c
        .post(format!("{}/v1/completions", s.base))
        .json(&json!({"prompt": "Once upon a time", "max_tokens": 24, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    let mut st = r.bytes_stream();
    let mut text = String::from_utf8(st.next().await.unwrap().unwrap().to_vec()).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(s.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    while let Some(b) = st.next().await {
        text += std::str::from_utf8(&b.unwrap()).unwrap();
    }
    assert!(text.contains("\"finish_reason\":\"length\""), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "still running: {:?}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?} {:?}", s.log());
    assert!(
        s.log()
            .iter()
            .any(|l| l.contains("SIGTERM") && l.contains("draining")),
        "{:?}",
        s.log()
    );
    assert!(c.get(format!("{}/health", s.base)).send().await.is_err());
}

/// A Hermes-style chat template (Qwen 2.5's way of writing tools, calls and results, cut down;
/// the tokenizer's rendering tests check what it writes), given to SmolLM2 with --chat-template:
/// SmolLM2's own template has no tools.
const HERMES_TEMPLATE: &str = include_str!("../../tokenizer/tests/fixtures/hermes_tools.jinja");

/// The calls of a response message as (name, arguments as JSON).
fn calls_of(message: &Value) -> Vec<(String, Value)> {
    message["tool_calls"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| {
                    assert_eq!(c["type"], "function", "{c}");
                    let id = c["id"].as_str().unwrap();
                    assert!(
                        id.len() == 9 && id.bytes().all(|b| b.is_ascii_alphanumeric()),
                        "{c}"
                    );
                    let args = c["function"]["arguments"].as_str().unwrap();
                    (
                        c["function"]["name"].as_str().unwrap().to_string(),
                        serde_json::from_str(args).unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Tool calls end to end on SmolLM2 with a Hermes-style template. The model is not steered by any
/// test hook: three earlier turns of the conversation show it calling `get_weather`, and greedy
/// decoding copies the pattern for a fourth city. The server's reading of the reply is checked
/// against the same reply generated with `tool_choice: "none"` (raw text) and read by the
/// library's parser, streamed and not; a required or named call is begun in the prompt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_are_read_from_replies_streamed_and_not() {
    let Some(model) = serving::model() else {
        return;
    };
    let s = Server::start(
        &model,
        &["--parallel", "1", "--chat-template", HERMES_TEMPLATE],
    );
    let c = client();
    let chat = format!("{}/v1/chat/completions", s.base);
    let tools = json!([{"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }}]);
    let mut msgs = Vec::new();
    for (i, city) in ["Paris", "Rome", "Oslo"].iter().enumerate() {
        let id = format!("call0000{i}");
        msgs.extend([
            json!({"role": "user", "content": format!("What is the weather in {city}?")}),
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": id, "type": "function",
                "function": {"name": "get_weather", "arguments": json!({"city": city}).to_string()}}]}),
            json!({"role": "tool", "tool_call_id": id, "content": "sunny"}),
            json!({"role": "assistant", "content": format!("It is sunny in {city}.")}),
        ]);
    }
    msgs.push(json!({"role": "user", "content": "What is the weather in Berlin?"}));
    let req = |choice: Value| json!({"messages": msgs, "tools": tools, "tool_choice": choice, "temperature": 0, "max_tokens": 40});

    // `none`: the raw reply, not read.
    let (st, v) = post(&c, chat.clone(), req(json!("none"))).await;
    assert_eq!(st, 200, "{v}");
    let raw = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let want = pshard_server::tools::ToolFormat::Hermes
        .parse(raw, &["get_weather".to_string()])
        .unwrap_or_else(|| panic!("the model's reply holds no valid call: {raw:?}"));
    let want_calls: Vec<(String, Value)> = want
        .calls
        .iter()
        .map(|c| (c.name.clone(), serde_json::from_str(&c.arguments).unwrap()))
        .collect();
    assert_eq!(
        want_calls[0],
        ("get_weather".to_string(), json!({"city": "Berlin"})),
        "{raw:?}"
    );

    // `auto` (also the default): the same reply, read into tool_calls.
    for choice in [json!("auto"), Value::Null] {
        let (st, v) = post(&c, chat.clone(), req(choice)).await;
        assert_eq!(st, 200, "{v}");
        let m = &v["choices"][0]["message"];
        assert_eq!(calls_of(m), want_calls, "{v}");
        assert_eq!(m["content"], Value::Null, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    }

    // Streamed: the role, the call's id and name, its arguments, the finish; no text.
    let mut body = req(json!("auto"));
    body["stream"] = json!(true);
    let events = sse(c.post(&chat).json(&body).send().await.unwrap()).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let deltas: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["delta"]).collect();
    assert!(
        deltas
            .iter()
            .all(|d| d["content"].as_str().is_none_or(str::is_empty)),
        "{chunks:?}"
    );
    let mut streamed: Vec<(String, String, String)> = Vec::new();
    for d in &deltas {
        for tc in d["tool_calls"].as_array().into_iter().flatten() {
            let i = tc["index"].as_u64().unwrap() as usize;
            if i == streamed.len() {
                assert_eq!(tc["type"], "function");
                streamed.push((
                    tc["id"].as_str().unwrap().to_string(),
                    String::new(),
                    String::new(),
                ));
            }
            let f = &tc["function"];
            streamed[i].1 += f["name"].as_str().unwrap_or("");
            streamed[i].2 += f["arguments"].as_str().unwrap_or("");
        }
    }
    let streamed_calls: Vec<(String, Value)> = streamed
        .iter()
        .map(|(id, n, a)| {
            assert_eq!(id.len(), 9);
            (n.clone(), serde_json::from_str(a).unwrap())
        })
        .collect();
    assert_eq!(streamed_calls, want_calls);
    assert_eq!(
        chunks[chunks.len() - 1]["choices"][0]["finish_reason"],
        "tool_calls"
    );

    // Required, or named: the call is begun in the prompt and the model finishes it.
    for choice in [
        json!("required"),
        json!({"type": "function", "function": {"name": "get_weather"}}),
    ] {
        let (st, v) = post(&c, chat.clone(), req(choice.clone())).await;
        assert_eq!(st, 200, "{v}");
        let calls = calls_of(&v["choices"][0]["message"]);
        assert_eq!(
            calls.first().map(|c| c.0.as_str()),
            Some("get_weather"),
            "{choice}: {v}"
        );
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    }

    // The reply goes back into the conversation with the tool's answer; the template renders it.
    let (_, v) = post(&c, chat.clone(), req(json!("auto"))).await;
    let mut next = msgs.clone();
    let answer = v["choices"][0]["message"].clone();
    let call_id = answer["tool_calls"][0]["id"].clone();
    next.push(answer);
    next.push(json!({"role": "tool", "tool_call_id": call_id, "content": "rain"}));
    let (st, v) = post(
        &c,
        chat.clone(),
        json!({"messages": next, "tools": tools, "temperature": 0, "max_tokens": 8}),
    )
    .await;
    assert_eq!(st, 200, "{v}");

    // Without tools the same template answers in text.
    let (st, v) = post(
        &c,
        chat.clone(),
        json!({"messages": [{"role": "user", "content": "Say hello."}], "temperature": 0, "max_tokens": 8}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
    assert!(
        v["choices"][0]["message"].get("tool_calls").is_none(),
        "{v}"
    );

    // Malformed tools and choices: 400 naming the field.
    let user = json!([{"role": "user", "content": "hi"}]);
    for (body, param) in [
        (
            json!({"messages": user, "tools": {"type": "function"}}),
            "tools",
        ),
        (
            json!({"messages": user, "tools": [{"type": "function", "function": {"description": "x"}}]}),
            "tools[0].function.name",
        ),
        (
            json!({"messages": user, "tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}),
            "tools[0].function.parameters",
        ),
        (
            json!({"messages": user, "tools": tools, "tool_choice": {"type": "function", "function": {"name": "launch"}}}),
            "tool_choice",
        ),
        (
            json!({"messages": user, "tool_choice": "required"}),
            "tool_choice",
        ),
        (
            json!({"messages": [{"role": "assistant", "content": null, "tool_calls": [{"id": "x", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}),
            "messages[0].tool_calls[0].function.arguments",
        ),
    ] {
        let (st, v) = post(&c, chat.clone(), body.clone()).await;
        assert_eq!(st, 400, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    }
}
