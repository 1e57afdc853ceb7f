//! The Kubernetes manifests: rendered with kustomize and checked against the Kubernetes
//! schemas, strict (deploy/validate-k8s.py, in the virtualenv provisioning makes), then held
//! to what surviving a node drain takes and to the code's own figures (body limit, connection
//! budget, stream and consumer names).

use std::{collections::HashMap, path::PathBuf, process::Command};

use fieldline_common::Config;
use serde_json::Value;

fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The virtualenv of deploy/local/provision.sh (`ensure_k8s_tools`).
fn python() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap();
    let python = cache.join("fieldline/k8s-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `make provision` (deploy/local/provision.sh installs kustomize and kubernetes-validate)",
        python.display()
    );
    python
}

fn render() -> Value {
    let output = Command::new(python())
        .arg(repository().join("deploy/validate-k8s.py"))
        .arg(repository().join("deploy"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "the manifests do not validate:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn of_kind<'a>(objects: &'a Value, kind: &str) -> Vec<&'a Value> {
    objects
        .as_array()
        .unwrap()
        .iter()
        .filter(|object| object["kind"] == kind)
        .collect()
}

fn named<'a>(objects: &'a Value, kind: &str, name: &str) -> Option<&'a Value> {
    of_kind(objects, kind)
        .into_iter()
        .find(|object| object["metadata"]["name"] == name)
}

fn int(value: &Value) -> u64 {
    value
        .as_u64()
        .or_else(|| value.as_str().and_then(|text| text.parse().ok()))
        .unwrap_or_else(|| panic!("not a number: {value}"))
}

/// `16m`, `2k`, `1048576`: nginx sizes in bytes.
fn nginx_size(size: &str) -> usize {
    let (number, unit) = size.split_at(size.trim_end_matches(['k', 'K', 'm', 'M']).len());
    let number: usize = number.parse().unwrap();
    number
        * match unit {
            "" => 1,
            "k" | "K" => 1024,
            "m" | "M" => 1024 * 1024,
            _ => unreachable!(),
        }
}

/// Whether `selector` (matchLabels, and matchExpressions with `In`) selects a pod with
/// `labels`. An empty selector selects every pod.
fn selects(selector: &Value, labels: &Value) -> bool {
    let by_labels = selector["matchLabels"]
        .as_object()
        .is_none_or(|wanted| wanted.iter().all(|(key, value)| labels[key] == *value));
    let by_expressions = selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|expression| {
            expression["operator"] == "In"
                && expression["values"]
                    .as_array()
                    .unwrap()
                    .contains(&labels[expression["key"].as_str().unwrap()])
        });
    selector.is_object() && by_labels && by_expressions
}

/// PostgreSQL connections one pod of `service` may open, per pool-size setting: its shared
/// pool, and query-api's read pools as many again (on the primary while no replica is fit).
fn pools_per_pod(service: &str) -> usize {
    match service {
        "query-api" => 2,
        "device-registry" | "webhook-dispatcher" => 1,
        _ => 0, // ingest-http and ingest-mqtt never connect to PostgreSQL
    }
}

#[test]
fn kubernetes_manifests_render_validate_and_survive_a_drain() {
    let rendered = render();
    let base = &rendered["k8s"];
    let keda = &rendered["k8s-keda"];
    let cluster = named(&rendered["k8s/postgres"], "Cluster", "postgres")
        .expect("a CloudNativePG Cluster named postgres");
    let defaults = Config::default();

    // Every Deployment serves HTTP (the API or /metrics and health): two replicas at least,
    // a budget that lets a drain take one at a time, spread, probes, and a pause before
    // SIGTERM that fits in the grace period with the services' own drain.
    let deployments = of_kind(base, "Deployment");
    assert_eq!(deployments.len(), 6);
    for deployment in &deployments {
        let name = deployment["metadata"]["name"].as_str().unwrap();
        let pod = &deployment["spec"]["template"];
        let labels = &pod["metadata"]["labels"];
        let min_replicas = match named(base, "HorizontalPodAutoscaler", name) {
            Some(hpa) => {
                assert!(
                    deployment["spec"]["replicas"].is_null(),
                    "{name}: the HPA owns replicas"
                );
                int(&hpa["spec"]["minReplicas"])
            }
            None => int(&deployment["spec"]["replicas"]),
        };
        assert!(min_replicas >= 2, "{name}: {min_replicas} replicas");
        let budget = of_kind(base, "PodDisruptionBudget")
            .into_iter()
            .find(|pdb| selects(&pdb["spec"]["selector"], labels))
            .unwrap_or_else(|| panic!("{name}: no PodDisruptionBudget"));
        assert_eq!(int(&budget["spec"]["maxUnavailable"]), 1, "{name}");
        let spread = pod["spec"]["topologySpreadConstraints"].as_array();
        let keys: Vec<&str> = spread
            .into_iter()
            .flatten()
            .filter(|constraint| selects(&constraint["labelSelector"], labels))
            .map(|constraint| constraint["topologyKey"].as_str().unwrap())
            .collect();
        assert!(
            keys.contains(&"kubernetes.io/hostname")
                && keys.contains(&"topology.kubernetes.io/zone"),
            "{name}: spread over {keys:?}"
        );
        let container = &pod["spec"]["containers"][0];
        assert!(
            container["startupProbe"].is_object(),
            "{name}: no startup probe"
        );
        assert!(
            container["readinessProbe"].is_object(),
            "{name}: no readiness probe"
        );
        let pause = int(&container["lifecycle"]["preStop"]["sleep"]["seconds"]);
        assert!(pause >= 3, "{name}: a preStop pause of {pause} s");
        let grace = int(&pod["spec"]["terminationGracePeriodSeconds"]);
        assert!(
            grace >= pause + defaults.shutdown_timeout.as_secs(),
            "{name}: grace {grace} s < pause {pause} s + shutdown timeout"
        );
    }

    // The Ingress, and readings-router behind it, take the largest body a service takes.
    let ingress = named(base, "Ingress", "fieldline").unwrap();
    let body = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
        .as_str()
        .unwrap();
    assert_eq!(nginx_size(body), defaults.backfill_max_body_bytes);
    assert!(defaults.backfill_max_body_bytes >= defaults.ingest_max_body_bytes);
    let router = named(base, "ConfigMap", "readings-router").unwrap()["data"]["nginx.conf"]
        .as_str()
        .unwrap();
    let router_body = router
        .lines()
        .find_map(|line| line.trim().strip_prefix("client_max_body_size "))
        .unwrap()
        .trim_end_matches(';');
    assert_eq!(nginx_size(router_body), defaults.backfill_max_body_bytes);

    // The connection budget: every pool of every pod at the most replicas either autoscaler
    // allows, within max_connections less the superuser's reserve and 10 for administration
    // and the operator.
    let env = &named(base, "ConfigMap", "fieldline-env").unwrap()["data"];
    let parameters = &cluster["spec"]["postgresql"]["parameters"];
    let max_connections = int(&parameters["max_connections"]) as usize;
    let reserved = int(&parameters["superuser_reserved_connections"]) as usize;
    let mut budget: HashMap<String, usize> = HashMap::new();
    for deployment in &deployments {
        let name = deployment["metadata"]["name"].as_str().unwrap();
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        let pool = container["env"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|var| var["name"] == "FIELDLINE_DATABASE_POOL_SIZE")
            .map(|var| &var["value"])
            .or(env.get("FIELDLINE_DATABASE_POOL_SIZE"))
            .map_or(defaults.database_pool_size, |size| int(size) as usize);
        let hpa_max = named(base, "HorizontalPodAutoscaler", name)
            .map_or(0, |hpa| int(&hpa["spec"]["maxReplicas"]));
        let keda_max = named(keda, "ScaledObject", name)
            .map_or(0, |scaled| int(&scaled["spec"]["maxReplicaCount"]));
        let fixed = deployment["spec"]["replicas"].as_u64().unwrap_or(0);
        let pods = hpa_max.max(keda_max).max(fixed) as usize;
        budget.insert(name.to_owned(), pods * pool * pools_per_pod(name));
    }
    let total: usize = budget.values().sum();
    assert!(
        total + reserved + 10 <= max_connections,
        "{total} connections ({budget:?}) + {reserved} reserved + 10 > max_connections {max_connections}"
    );
    assert!(total > 0, "{budget:?}");

    // PostgreSQL: a primary and a replica, the services on the primary's Service and
    // query-api's history on the replicas'.
    assert!(int(&cluster["spec"]["instances"]) >= 2);
    let url = |key: &str| env[key].as_str().unwrap_or_default().to_owned();
    assert!(url("FIELDLINE_DATABASE_URL").contains("@postgres-rw."));
    assert!(url("FIELDLINE_DATABASE_READ_URL").contains("@postgres-ro."));

    // NATS: three JetStream nodes, each one a seed of the services.
    let nats = &rendered["nats_values"];
    assert_eq!(nats["config"]["cluster"]["enabled"], true);
    assert_eq!(int(&nats["config"]["cluster"]["replicas"]), 3);
    assert_eq!(nats["config"]["jetstream"]["enabled"], true);
    assert_eq!(nats["config"]["jetstream"]["fileStore"]["enabled"], true);
    let seeds = url("FIELDLINE_NATS_URL");
    for node in 0..3 {
        assert!(seeds.contains(&format!("nats-{node}.")), "{seeds}");
    }

    // KEDA: the consumer services scale on the lag of consumers that exist, in place of
    // their CPU HPA (two autoscalers on one Deployment fight).
    let subjects = defaults.subjects();
    let consumers = [
        (
            fieldline_proto::consumers::QUERY_WRITER,
            fieldline_proto::Stream::Telemetry,
        ),
        (
            fieldline_proto::consumers::WEBHOOK_DATA,
            fieldline_proto::Stream::Telemetry,
        ),
        (
            fieldline_proto::consumers::WEBHOOK_EVENTS,
            fieldline_proto::Stream::Events,
        ),
        (
            fieldline_proto::consumers::REGISTRY_STATE,
            fieldline_proto::Stream::Telemetry,
        ),
    ];
    let scaled = of_kind(keda, "ScaledObject");
    assert_eq!(scaled.len(), 3);
    let mut scaled_consumers = Vec::new();
    for object in scaled {
        let name = object["metadata"]["name"].as_str().unwrap();
        assert_eq!(object["spec"]["scaleTargetRef"]["name"], name);
        assert!(named(keda, "Deployment", name).is_some(), "{name}");
        assert!(
            named(keda, "HorizontalPodAutoscaler", name).is_none(),
            "{name}"
        );
        assert!(int(&object["spec"]["minReplicaCount"]) >= 2, "{name}");
        for trigger in object["spec"]["triggers"].as_array().unwrap() {
            if trigger["type"] != "nats-jetstream" {
                continue;
            }
            let consumer = trigger["metadata"]["consumer"].as_str().unwrap();
            let (_, stream) = consumers
                .iter()
                .find(|(known, _)| *known == consumer)
                .unwrap_or_else(|| panic!("{name}: no consumer {consumer}"));
            assert_eq!(trigger["metadata"]["stream"], subjects.stream_name(*stream));
            scaled_consumers.push(consumer);
        }
    }
    assert_eq!(scaled_consumers.len(), 4, "{scaled_consumers:?}");

    // NetworkPolicies: nothing in unless allowed, and every HTTP port open to the ingress
    // controller or readings-router.
    let policies = of_kind(base, "NetworkPolicy");
    assert!(policies.iter().any(|policy| {
        policy["spec"]["podSelector"]
            .as_object()
            .is_some_and(|s| s.is_empty())
            && policy["spec"]["ingress"].is_null()
    }));
    for deployment in &deployments {
        let name = deployment["metadata"]["name"].as_str().unwrap();
        let labels = &deployment["spec"]["template"]["metadata"]["labels"];
        let reachable = policies.iter().any(|policy| {
            selects(&policy["spec"]["podSelector"], labels)
                && policy["spec"]["ingress"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|rule| {
                        let port = rule["ports"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|port| port["port"] == 8080);
                        let from = rule["from"].as_array().into_iter().flatten().any(|peer| {
                            peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                                == "ingress-nginx"
                                || peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
                                    == "readings-router"
                        });
                        port && from
                    })
        });
        // ingest-mqtt serves only health and /metrics.
        assert_eq!(
            reachable,
            name != "ingest-mqtt",
            "{name}: HTTP from the ingress"
        );
    }

    // The broker keeps its Dynamic Security file on its volume.
    let broker = named(base, "StatefulSet", "mosquitto").unwrap();
    let conf = named(base, "ConfigMap", "mosquitto").unwrap()["data"]["mosquitto.conf"]
        .as_str()
        .unwrap();
    let dynsec = conf
        .lines()
        .find_map(|line| line.strip_prefix("plugin_opt_config_file "))
        .unwrap();
    let claims: Vec<&str> = broker["spec"]["volumeClaimTemplates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|claim| claim["metadata"]["name"].as_str().unwrap())
        .collect();
    let mounts = broker["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap();
    assert!(
        mounts
            .iter()
            .any(|mount| claims.contains(&mount["name"].as_str().unwrap())
                && dynsec.starts_with(mount["mountPath"].as_str().unwrap())),
        "{dynsec} is not on a volume claim"
    );
}
