//! The deployment artifacts, checked offline: the kustomize base renders and validates
//! against the Kubernetes 1.32 schemas, its DaemonSet only passes flags `clyde` has, its init
//! container writes what containerd needs, and the Helm chart's templates only use values
//! that exist. (No API server and no `helm` binary here: the chart is not rendered.)

use std::path::{Path, PathBuf};
use std::process::Command;

use clyde_tests::{agent::clyde_bin, require, run};
use serde::Deserialize as _;
use serde_yaml::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

fn rendered() -> Vec<Value> {
    rendered_from("deploy/kustomize")
}

fn rendered_from(dir: &str) -> Vec<Value> {
    let kubectl = require("kubectl", "kubectl (it comes with the machine image; kustomize is built in)");
    let out = run(Command::new(kubectl).arg("kustomize").arg(repo().join(dir)));
    serde_yaml::Deserializer::from_str(&out).map(|d| Value::deserialize(d).expect("yaml")).collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind} rendered"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_string)).collect()
}

/// Every `--flag` in `args` appears in `clyde <subcommand> --help`.
fn assert_flags_exist(args: &[String]) {
    let subcommand = &args[0];
    let help = run(Command::new(clyde_bin()).arg(subcommand).arg("--help"));
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        assert!(help.contains(flag.as_str()), "`clyde {subcommand}` has no {flag}:\n{help}");
    }
}

fn validate(docs: &[Value]) -> String {
    let file = tempfile::NamedTempFile::new().expect("tempfile");
    std::fs::write(file.path(), serde_yaml_docs(docs)).expect("write");
    let validate = require("kubernetes-validate", "kubernetes-validate (pip; scripts/test installs it)");
    let out = Command::new(validate).args(["--strict", "-k", "1.32.0"]).arg(file.path()).output().expect("run");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "kubernetes-validate refused the manifests:\n{text}");
    text
}

#[test]
fn kustomize_base_validates_against_the_kubernetes_schemas() {
    let text = validate(&rendered());
    for kind in ["namespace", "serviceaccount", "configmap", "secret", "service", "daemonset"] {
        assert!(text.contains(&format!("passed for resource {kind}/")), "{kind} was not validated:\n{text}");
    }
}

fn serde_yaml_docs(docs: &[Value]) -> String {
    docs.iter().map(|d| format!("---\n{}", serde_yaml::to_string(d).expect("yaml"))).collect()
}

#[test]
fn the_daemonset_runs_on_every_node_with_what_the_agent_needs() {
    let docs = rendered();
    let ds = find(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true, "containerd reaches the mirror on the node's 127.0.0.1");
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["tolerations"][0]["operator"], "Exists");
    assert_eq!(pod["automountServiceAccountToken"], false);
    let agent = &pod["containers"][0];
    let args = strings(&agent["args"]);
    assert_eq!(args[0], "serve");
    assert_flags_exist(&args);
    assert_eq!(agent["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(agent["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert!(agent["resources"]["requests"]["memory"].is_string() && agent["resources"]["limits"]["memory"].is_string());
    // Peers find each other through the headless Service's name.
    let service = find(&docs, "Service");
    assert_eq!(service["spec"]["clusterIP"], "None");
    assert_eq!(service["spec"]["publishNotReadyAddresses"], true);
    let namespace = ds["metadata"]["namespace"].as_str().expect("namespace");
    let name = service["metadata"]["name"].as_str().expect("name");
    let dns = args.iter().skip_while(|a| *a != "--bootstrap-dns").nth(1).expect("--bootstrap-dns");
    assert_eq!(dns, &format!("{name}.{namespace}.svc.cluster.local:30023"));
    // The init container's command works as written.
    let init = strings(&pod["initContainers"][0]["args"]);
    assert_eq!(init[0], "containerd-config");
    assert_flags_exist(&init);
    let hosts = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(clyde_bin());
    cmd.args(
        init.iter().map(|a| if a == "/etc/containerd/certs.d" { hosts.path().to_str().expect("utf8") } else { a }),
    );
    run(&mut cmd);
    let written = std::fs::read_to_string(hosts.path().join("_default/hosts.toml")).expect("_default/hosts.toml");
    assert!(written.contains("[host.\"http://127.0.0.1:30021\"]"), "{written}");
    assert!(written.contains("capabilities = [\"pull\", \"resolve\"]"), "{written}");
}

#[test]
fn agents_get_the_cluster_secret_from_a_read_only_secret_and_refuse_the_placeholder() {
    let docs = rendered();
    let secret = docs.iter().find(|d| d["kind"] == "Secret").expect("a Secret");
    let name = secret["metadata"]["name"].as_str().expect("name");
    let ds = find(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let volume = strings_of(&pod["volumes"]).into_iter().find(|v| v["secret"]["secretName"] == name).expect("volume");
    let agent = &pod["containers"][0];
    let mount = strings_of(&agent["volumeMounts"]).into_iter().find(|m| m["name"] == volume["name"]).expect("mount");
    assert_eq!(mount["readOnly"], true);
    let args = strings(&agent["args"]);
    let file = args.iter().skip_while(|a| *a != "--cluster-secret-file").nth(1).expect("--cluster-secret-file");
    let dir = mount["mountPath"].as_str().expect("path");
    let key = file.strip_prefix(&format!("{dir}/")).expect("the flag names a file of the mounted Secret");
    assert!(secret["data"][key].is_string(), "the Secret has no key {key}");
    // As shipped, the secret is a placeholder the agent refuses, saying what to do.
    let placeholder = repo().join("deploy/kustomize/cluster-secret");
    let data = tempfile::tempdir().expect("tempdir");
    let log = data.path().join("serve.log");
    let mut child = clyde_tests::spawn_logged(
        Command::new(clyde_bin())
            .args(["serve", "--config", "/dev/null", "--data-dir"])
            .arg(data.path().join("data"))
            .args(["--mirror-addr", "127.0.0.1:0", "--peer-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"])
            .args(["--p2p-addr", "/ip4/127.0.0.1/tcp/0", "--containerd-socket", ""])
            .arg("--cluster-secret-file")
            .arg(&placeholder),
        &log,
    );
    let status = clyde_tests::poll(std::time::Duration::from_secs(20), || child.try_wait().ok().flatten());
    if status.is_none() {
        let _ = child.kill();
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.is_some_and(|s| !s.success()), "the agent started on the placeholder:\n{text}");
    assert!(text.contains("head -c 32 /dev/urandom"), "{text}");
}

fn strings_of(v: &Value) -> Vec<Value> {
    v.as_sequence().cloned().unwrap_or_default()
}

/// `.Values.a.b` paths used in the chart's templates.
fn value_paths(template: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for (i, _) in template.match_indices(".Values.") {
        let rest = &template[i + ".Values.".len()..];
        let path: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '_').collect();
        out.push(path.trim_end_matches('.').split('.').map(str::to_string).collect());
    }
    out
}

#[test]
fn the_helm_chart_uses_only_values_it_defines() {
    let chart = repo().join("deploy/helm/clyde");
    let meta: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart.join("Chart.yaml")).expect("Chart.yaml")).expect("yaml");
    assert_eq!(meta["name"], "clyde");
    let values: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart.join("values.yaml")).expect("values.yaml")).expect("yaml");
    let mut checked = 0;
    for entry in std::fs::read_dir(chart.join("templates")).expect("templates") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("template");
        for keys in value_paths(&text) {
            let mut v = &values;
            for k in &keys {
                v = &v[k.as_str()];
            }
            assert!(!v.is_null(), "{}: .Values.{} is not in values.yaml", path.display(), keys.join("."));
            checked += 1;
        }
    }
    assert!(checked > 10, "only {checked} values referenced");
}

#[test]
fn the_endpointslices_overlay_watches_the_service_with_read_only_rbac() {
    let docs = rendered_from("deploy/endpointslices");
    let text = validate(&docs);
    for kind in ["role", "rolebinding", "daemonset"] {
        assert!(text.contains(&format!("passed for resource {kind}/")), "{kind} was not validated:\n{text}");
    }
    let role = find(&docs, "Role");
    let rules = role["rules"].as_sequence().expect("rules");
    assert_eq!(rules.len(), 1, "one rule: {rules:?}");
    assert_eq!(strings(&rules[0]["apiGroups"]), ["discovery.k8s.io"]);
    assert_eq!(strings(&rules[0]["resources"]), ["endpointslices"]);
    assert_eq!(strings(&rules[0]["verbs"]), ["get", "list", "watch"]);
    let binding = find(&docs, "RoleBinding");
    assert_eq!(binding["subjects"][0]["name"], "clyde");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let pod = &find(&docs, "DaemonSet")["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], true);
    let args = strings(&pod["containers"][0]["args"]);
    let at = args.iter().position(|a| a == "--bootstrap-kubernetes").expect("--bootstrap-kubernetes");
    assert_eq!(args[at + 1], "clyde/clyde-peers:30023");
    assert!(!args.contains(&"--bootstrap-dns".to_string()));
    let service = find(&docs, "Service");
    assert_eq!(service["metadata"]["name"], "clyde-peers");
    assert_flags_exist(&args);
}
