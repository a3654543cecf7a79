//! Every column type DESIGN.md lists, inserted through Postgres and read back from the stream:
//! the exact JSON of `after` per the value mapping (Reader → Values).

#![recursion_limit = "256"]

mod common;

use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use cdc::envelope::Op;
use common::Env;
use serde_json::{json, Value};

const SCHEMA: &str = r#"
CREATE TYPE mood AS ENUM ('happy', 'sad', 'ünïcode');
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE DOMAIN posint2 AS posint;
CREATE DOMAIN shorttext AS text CHECK (length(VALUE) < 100);
CREATE TABLE all_types (
    id int PRIMARY KEY,
    i2 int2, i4 int4, i8 int8,
    f4 float4, f8 float8, f8_big float8,
    f4_nan float4, f8_inf float8, f8_ninf float8,
    num numeric, num_nan numeric,
    b bool, b2 bool,
    t text, vc varchar(20), ch char(6), nm name,
    j json, jb jsonb, jb_arr jsonb,
    u uuid,
    d date, tm time, ttz timetz, ts timestamp, ts_inf timestamp, tstz timestamptz, iv interval,
    ip inet, ip6 inet, net cidr, mac macaddr,
    by bytea,
    ia int[], ta text[], ia2 int[][], ia_empty int[], fa float8[], moods mood[],
    mood mood, pi posint, pi2 posint2, st shorttext
);
"#;

const INSERT: &str = r#"
INSERT INTO all_types VALUES (
    1,
    -32768, 2147483647, 9223372036854775807,
    0.1, -1.2345678901234567, 1e300,
    'NaN', 'Infinity', '-Infinity',
    '-1234567890123456789012345678901234567890.0123456789', 'NaN',
    true, false,
    E'héllo\n"wörld" \\ 🎉', 'naïve café', 'ñu', 'ñame_名前',
    '{"b": [1, 2.5, null, "x"], "a": {"nested": true}}',
    '{"ü": "ß", "n": 12345678901234567890, "arr": []}',
    '[1, "two", null]',
    'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11',
    '2024-02-29', '23:59:59.999999', '13:14:15.5+05:30',
    '2024-02-29 13:14:15.5', 'infinity', '2024-02-29 13:14:15.123+02',
    '1 year 2 months 3 days 4 hours 5 minutes 6.5 seconds',
    '192.168.100.128/25', '::1', '10.1.0.0/16', '08:00:2B:01:02:03',
    '\x00ff10fe',
    '{1,NULL,-3}',
    ARRAY['a', NULL, 'NULL', 'x,y', 'q"uote', 'ü', '', 'back\slash'],
    '{{1,2},{3,NULL}}', '{}', '{1.5,NaN,-Infinity}', '{happy,ünïcode}',
    'ünïcode', 42, 7, 'dom ü'
);
INSERT INTO all_types (id) VALUES (2);
"#;

fn expected_row1() -> Value {
    json!({
        "id": 1,
        "i2": -32768,
        "i4": 2147483647,
        "i8": 9223372036854775807_i64,
        "f4": 0.1,
        "f8": -1.2345678901234567,
        "f8_big": 1e300,
        "f4_nan": "NaN",
        "f8_inf": "Infinity",
        "f8_ninf": "-Infinity",
        "num": "-1234567890123456789012345678901234567890.0123456789",
        "num_nan": "NaN",
        "b": true,
        "b2": false,
        "t": "héllo\n\"wörld\" \\ 🎉",
        "vc": "naïve café",
        "ch": "ñu    ",
        "nm": "ñame_名前",
        "j": {"b": [1, 2.5, null, "x"], "a": {"nested": true}},
        "jb": {"ü": "ß", "n": 12345678901234567890_u64, "arr": []},
        "jb_arr": [1, "two", null],
        "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "d": "2024-02-29",
        "tm": "23:59:59.999999",
        "ttz": "13:14:15.5+05:30",
        "ts": "2024-02-29T13:14:15.5",
        "ts_inf": "infinity",
        "tstz": "2024-02-29T11:14:15.123Z",
        "iv": "P1Y2M3DT4H5M6.5S",
        "ip": "192.168.100.128/25",
        "ip6": "::1",
        "net": "10.1.0.0/16",
        "mac": "08:00:2b:01:02:03",
        "by": "AP8Q/g==",
        "ia": [1, null, -3],
        "ta": ["a", null, "NULL", "x,y", "q\"uote", "ü", "", "back\\slash"],
        "ia2": [[1, 2], [3, null]],
        "ia_empty": [],
        "fa": [1.5, "NaN", "-Infinity"],
        "moods": ["happy", "ünïcode"],
        "mood": "ünïcode",
        "pi": 42,
        "pi2": 7,
        "st": "dom ü",
    })
}

/// Compares column by column so a failure names every column that differs.
fn check_after(got: &Value, want: &Value) -> Result<()> {
    let (got, want) = (
        got.as_object().context("after is not an object")?,
        want.as_object().context("expected is not an object")?,
    );
    let mut problems = Vec::new();
    for (col, w) in want {
        match got.get(col) {
            Some(g) if g == w => {}
            Some(g) => problems.push(format!("{col}: got {g}, want {w}")),
            None => problems.push(format!("{col}: missing")),
        }
    }
    for col in got.keys().filter(|c| !want.contains_key(*c)) {
        problems.push(format!("{col}: unexpected column"));
    }
    ensure!(
        problems.is_empty(),
        "after differs:\n{}",
        problems.join("\n")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listed_type_maps_to_the_documented_json() -> Result<()> {
    let env = Env::start(SCHEMA, &["public.all_types"]).await?;
    let _reader = env.start_reader().await?;
    env.sql().await?.batch_execute(INSERT).await?;
    let got = env.wait_for_events(2, Duration::from_secs(60)).await?;
    ensure!(got.len() == 2, "{got:?}");
    for r in &got {
        ensure!(r.event.op == Op::Create, "{:?}", r.event);
        ensure!(r.event.unchanged_toast.is_empty());
    }

    let row1 = Value::Object(got[0].event.after.clone().context("row 1 has no after")?);
    check_after(&row1, &expected_row1())?;

    // Row 2: NULL in every column but the key.
    let row2 = Value::Object(got[1].event.after.clone().context("row 2 has no after")?);
    let mut want2 = expected_row1();
    for (col, v) in want2.as_object_mut().context("object")? {
        *v = if col == "id" { json!(2) } else { Value::Null };
    }
    check_after(&row2, &want2)?;

    // The body on the wire carries the same JSON (nothing lost in the envelope type).
    let js = env.jetstream().await?;
    let stream = js.get_stream(&env.stream).await?;
    let raw = stream.get_raw_message(got[0].seq).await?;
    let body: Value = serde_json::from_slice(&raw.payload)?;
    check_after(&body["after"], &expected_row1())?;
    Ok(())
}

/// Rows that exist before the reader starts reach the stream as snapshot reads (COPY's text
/// format, not pgoutput's): their JSON must be the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_reads_map_every_listed_type_like_the_stream() -> Result<()> {
    let env = Env::start(SCHEMA, &["public.all_types"]).await?;
    env.sql().await?.batch_execute(INSERT).await?;
    let _reader = env.start_reader().await?;
    // Two reads and the snapshot end.
    let got = env.wait_for_all_events(3, Duration::from_secs(60)).await?;
    let reads: Vec<_> = got.iter().filter(|r| r.event.op == Op::Read).collect();
    ensure!(reads.len() == 2, "{got:?}");
    let end = got
        .iter()
        .find(|r| r.event.op == Op::SnapshotEnd)
        .with_context(|| format!("no snapshot end in {got:?}"))?;
    // Where the snapshot began: at least where the slot's stream began, never 0/0 (an agent
    // removes the rows it last wrote before it).
    ensure!(
        end.event.source.lsn > cdc::Lsn::ZERO,
        "snapshot end at {}",
        end.event.source.lsn
    );
    let row1 = Value::Object(reads[0].event.after.clone().context("row 1 has no after")?);
    check_after(&row1, &expected_row1())?;
    let row2 = Value::Object(reads[1].event.after.clone().context("row 2 has no after")?);
    let mut want2 = expected_row1();
    for (col, v) in want2.as_object_mut().context("object")? {
        *v = if col == "id" { json!(2) } else { Value::Null };
    }
    check_after(&row2, &want2)?;
    Ok(())
}
