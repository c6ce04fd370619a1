//! Inbound transactions and `m.direct_to_device` EDUs
//! (`courier::federation::edu::parse_to_device`) on arbitrary JSON.
//!
//! The input is any JSON value: a transaction (`{"origin": .., "edus": [..]}`, each
//! EDU checked for that origin) or a single EDU (checked for `o.test`). Properties,
//! beyond "never panics":
//! - an accepted EDU's sender belongs to the origin and its `message_id` is 1 to 32
//!   code points;
//! - what courier packs for an accepted EDU's sender (`pack_to_device`, the outbound
//!   side) is accepted back for that origin and carries exactly the same messages.
#![no_main]

use courier::federation::edu::{DIRECT_TO_DEVICE, edu_type, pack_to_device, parse_to_device};
use courier::ids::UserId;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let origin = v.get("origin").and_then(Value::as_str).unwrap_or("o.test");
    let edus: Vec<&Value> = match v.get("edus").and_then(Value::as_array) {
        Some(list) => list.iter().collect(),
        None => vec![&v],
    };
    for edu in edus {
        let _ = edu_type(edu);
        let Ok(td) = parse_to_device(edu, origin) else {
            continue;
        };
        let sender = UserId::parse(td.sender).expect("an accepted sender is a user ID");
        assert_eq!(sender.server_name(), origin, "sender of another server");
        let n = td.message_id.chars().count();
        assert!((1..=32).contains(&n), "message_id of {n} code points");

        // Users whose device map is a non-empty object are what packing carries.
        let want: Map<String, Value> = td
            .messages
            .iter()
            .filter(|(_, d)| d.as_object().is_some_and(|d| !d.is_empty()))
            .map(|(u, d)| (u.clone(), d.clone()))
            .collect();
        let mut got: Map<String, Value> = Map::new();
        for packed in pack_to_device(td.sender, td.event_type, td.messages) {
            let p: Value = serde_json::from_slice(&packed).expect("packed EDU is JSON");
            assert_eq!(edu_type(&p), Some(DIRECT_TO_DEVICE));
            let back = parse_to_device(&p, origin)
                .unwrap_or_else(|e| panic!("our own EDU is refused: {e}"));
            assert_eq!((back.sender, back.event_type), (td.sender, td.event_type));
            for (user, devices) in back.messages {
                let slot = got
                    .entry(user.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                for (device, content) in devices.as_object().expect("packed devices") {
                    let old = slot
                        .as_object_mut()
                        .expect("object")
                        .insert(device.clone(), content.clone());
                    assert!(old.is_none(), "{user}/{device} packed twice");
                }
            }
        }
        assert_eq!(got, want, "packing lost or changed messages");
    }
});
