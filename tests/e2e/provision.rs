//! deploy/local/provision.sh's broker step against a private mosquitto (its own file, port and
//! state directory, never the machine's): a broker lacking Fieldline's settings is given them
//! and restarted; provisioning again leaves the same process running.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use fieldline_testkit::{servers::free_port, unique_suffix};

fn pid_listening(port: u16) -> Option<u32> {
    let output = Command::new("ss")
        .args(["-ltnpH", &format!("sport = :{port}")])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let start = text.find("pid=")? + 4;
    text[start..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn wait_for_listener(port: u16) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(pid) = pid_listening(port) {
            return pid;
        }
        assert!(Instant::now() < deadline, "no mosquitto on port {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn provision(dir: &Path, port: u16) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/local/provision.sh");
    let output = Command::new("bash")
        .arg(script)
        .env("FL_PROVISION_ONLY", "mosquitto")
        .env("FL_MQTT_CONF", dir.join("mosquitto.conf"))
        .env("FL_MQTT_PORT", port.to_string())
        .env("FL_MQTT_STATE_DIR", dir.join("state"))
        .env("FL_MQTT_ADMIN_PASSWORD", "provision-test-admin")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "provision failed: {text}");
    text
}

/// Kills the private broker whatever happens to the test.
struct Broker {
    port: u16,
    dir: PathBuf,
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(pid) = pid_listening(self.port) {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn anonymous_publish_works(port: u16) -> bool {
    Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            "x",
            "-m",
            "y",
        ])
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn provision_restarts_a_broker_without_the_settings_and_leaves_a_right_one_running() {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("fieldline-provision-{}", unique_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    // Started as root, mosquitto runs as its own user: it writes here.
    Command::new("chmod")
        .args(["0777", dir.to_str().unwrap()])
        .status()
        .unwrap();
    let broker = Broker {
        port,
        dir: dir.clone(),
    };
    std::fs::write(
        dir.join("mosquitto.conf"),
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
             persistence_location {dir}/\nlog_dest file {dir}/mosquitto.log\n",
            dir = dir.display()
        ),
    )
    .unwrap();
    let status = Command::new("mosquitto")
        .args(["-d", "-c", dir.join("mosquitto.conf").to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let first = wait_for_listener(port);
    assert!(anonymous_publish_works(port));

    // Lacking the settings: they are written, and the broker restarts with them.
    let said = provision(&dir, port);
    assert!(
        said.contains(&format!("restarting mosquitto (pid {first})")),
        "{said}"
    );
    let second = wait_for_listener(port);
    assert_ne!(second, first);
    let conf = std::fs::read_to_string(dir.join("mosquitto.conf")).unwrap();
    assert!(conf.contains("allow_anonymous false") && conf.contains("max_queued_messages"));
    assert!(!anonymous_publish_works(port), "anonymous clients refused");

    // Already right: the same process keeps running, twice over.
    for _ in 0..2 {
        let said = provision(&dir, port);
        assert!(
            said.contains(&format!(
                "mosquitto (pid {second}) already runs with Fieldline's settings; left alone"
            )),
            "{said}"
        );
        assert!(!said.contains("restarting"), "{said}");
        assert_eq!(pid_listening(port), Some(second));
    }
    drop(broker);
}
