"""sensepack_common.logs: the one logging setup, its two JSON line shapes, and repeated setup."""

import json
import logging
import re

from sensepack_common.logs import setup_logging


def test_service_lines_carry_iso_time_message_and_extras(capsys):
    setup_logging("INFO", json_logs=True, logger="sensepack.test.service")
    lg = logging.getLogger("sensepack.test.service")
    lg.info("request done", extra={"request_id": "r1", "tokens": 3})
    lg.debug("below the level")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["ts"])
    assert {k: rec[k] for k in ("level", "logger", "msg", "request_id", "tokens")} == {
        "level": "INFO",
        "logger": "sensepack.test.service",
        "msg": "request done",
        "request_id": "r1",
        "tokens": 3,
    }


def test_run_log_file_keeps_its_shape_and_setup_replaces_its_handlers(tmp_path, capsys):
    name = "sensepack.test.run"
    for _ in range(3):  # a command that sets up again must not write each record three times
        setup_logging("INFO", json_logs=False, logger=name, file=tmp_path / "log.jsonl", console_level="WARNING")
    lg = logging.getLogger(name)
    lg.info("epoch", extra={"fields": {"epoch": 2, "g_ratio": 1.0001}})
    lg.warning("slow")
    for h in lg.handlers:
        h.flush()
    recs = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in recs] == ["epoch", "slow"]
    assert isinstance(recs[0]["ts"], float) and "fields" not in recs[0]
    assert (recs[0]["epoch"], recs[0]["g_ratio"], recs[0]["logger"]) == (2, 1.0001, name)
    err = capsys.readouterr().err
    assert "slow" in err and "epoch" not in err  # the console shows warnings only
    assert len(lg.handlers) == 2 and not lg.propagate
    setup_logging("INFO", logger=name)  # again, without a file: the file handler goes and is closed
    assert len(lg.handlers) == 1
