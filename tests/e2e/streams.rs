//! Stream bounds follow the configuration, also for streams that already exist.

use std::time::Duration;

use fieldline_common::bus;
use fieldline_proto::Stream;
use fieldline_testkit::TestEnv;

#[tokio::test]
async fn existing_streams_are_brought_to_the_configured_bounds() {
    let env = TestEnv::new().await;
    let config = env.config();
    let subjects = config.subjects();
    let jetstream = async_nats::jetstream::new(env.nats().await);
    bus::ensure_streams(
        &jetstream,
        &subjects,
        config.stream_limits(),
        &config.stream_replication(),
    )
    .await
    .unwrap();
    let mut tighter = config.stream_limits();
    tighter.max_age = Duration::from_secs(3600);
    tighter.max_bytes = 32 << 20;
    tighter.dead_max_bytes = 4 << 20;
    bus::ensure_streams(&jetstream, &subjects, tighter, &config.stream_replication())
        .await
        .unwrap();
    for stream in Stream::ALL {
        let info = jetstream
            .get_stream(subjects.stream_name(stream))
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .config
            .clone();
        let (age, bytes) = match stream {
            Stream::DeadLetters => (config.dead_letter_max_age, 4 << 20),
            _ => (Duration::from_secs(3600), 32 << 20),
        };
        assert_eq!((info.max_age, info.max_bytes), (age, bytes), "{stream:?}");
    }
    env.cleanup().await;
}

/// More than one replica on a single nats-server is refused with an error that names the
/// setting.
#[tokio::test]
async fn three_replicas_on_a_single_server_are_refused_with_the_setting_named() {
    let env = TestEnv::new().await;
    let config = env.config();
    let jetstream = async_nats::jetstream::new(env.nats().await);
    let three = fieldline_proto::Replication {
        replicas: 3,
        placement: None,
    };
    let error = bus::ensure_streams(
        &jetstream,
        &config.subjects(),
        config.stream_limits(),
        &three,
    )
    .await
    .unwrap_err();
    let shown = format!("{error:#}");
    assert!(shown.contains("FIELDLINE_STREAM_REPLICAS"), "{shown}");
    env.cleanup().await;
}
