"""The demo: both simulators on loopback, realistic activities, the real program over mutual TLS.

    make demo        (or: .venv/bin/python -m simulators.demo)

Seeds a data-tracker app with activities of several service requests that exercise every rule (code
lookup, a record's own CSR code, activities 311 does not want, an unknown activity that fails and holds the
later activity of its SR, closed_duplicate, awkward and non-ASCII text, both sides of daylight saving),
runs `send_esb_message.py data-tracker`, then shows what the ESB received and what Knack now says.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from config import CONFIG
from simulators.activities import activity_record, app_metadata
from simulators.certs import make_pki
from simulators.esb import ESBSimulator, parse_message
from simulators.knack_api import KnackSimulator

PROJECT_ROOT = Path(__file__).resolve().parents[1]
APP = "data-tracker"
APP_ID = "5d79512148c4af00106d1507"
API_KEY = "demo-api-key-not-a-secret"

# (atd id, SR, activity name, local time, details, extra)
ACTIVITIES = [
    (501, "24-00012001", "Dispatch Technician", dt.datetime(2024, 7, 4, 9, 15), "Crew sent to Lamar & 5th.", {}),
    (502, "24-00012001", "Adjust Timing", dt.datetime(2024, 7, 4, 10, 40),
     "Cycle length 120 -> 100s; ped timing < 7s fixed.\nChecked at 10:40 <ok>.", {}),
    (503, "24-00012001", "Close Issue (Resolved)", dt.datetime(2024, 7, 4, 11, 5), "Resolved on site.",
     {"issue_status": "closed_resolved"}),
    (504, "24-00012002", "Post Tweet", dt.datetime(2024, 1, 15, 8, 0), "Internal only: tweet sent.", {}),
    (505, "24-00012002", "Identify Asset", dt.datetime(2024, 1, 15, 8, 30), "Señal en la esquina; café ☕ 日本",
     {}),
    (506, "24-00012003", "Repaint Crosswalk", dt.datetime(2024, 3, 10, 1, 59), "Not a data-tracker activity.", {}),
    (507, "24-00012003", "Close Issue (Resolved)", dt.datetime(2024, 3, 10, 3, 1),
     "Waits for 506: 311 must not see it first.", {}),
    (508, "24-00012004", "Close Issue (Duplicate)", dt.datetime(2024, 11, 3, 1, 30), "Same as 24-00012001.",
     {"issue_status": "closed_duplicate"}),
    (509, "24-00012005", "Coordinate Internally/Externally", dt.datetime(2024, 11, 3, 2, 30),
     'Staff typed ]]> and </activity_details><sr_number>X</sr_number> and "quotes" \x07bell',
     {"csr_activity_id": "CSR-998877"}),
    (510, "24-00012006", "Other", dt.datetime(2024, 12, 24, 16, 45), "Has its own CSR code, so it goes.",
     {"csr_activity_code": "COORINTE"}),
]


def seed(knack: KnackSimulator) -> None:
    config = CONFIG[APP]
    records = [
        activity_record(config, app_name=APP, record_id=f"64b0{atd:020d}", atd_activity_id=atd,
                        emi_id=f"EMI-{atd}", sr_number=sr, activity_name=name, activity_datetime=when,
                        activity_details=details, issue_status=extra.pop("issue_status", "open"), **extra)
        for atd, sr, name, when, details, extra in ACTIVITIES
    ]
    # seeded newest first: the program must put them back in ascending order
    knack.add_records(config["obj"], list(reversed(records)))


def main() -> int:
    config = CONFIG[APP]
    with tempfile.TemporaryDirectory(prefix="knack311-demo-") as tmp:
        pki = make_pki(Path(tmp) / "pki")
        metadata = app_metadata(APP, config, timezone="Central Time (US & Canada)", app_id=APP_ID)
        with KnackSimulator(app_id=APP_ID, api_key=API_KEY, metadata=metadata) as knack, \
                ESBSimulator(server_cert=pki.server_cert, server_key=pki.server_key,
                             client_ca_bundle=pki.client_ca_bundle) as esb:
            seed(knack)
            env = {
                **os.environ,
                "KNACK_APP_ID": APP_ID, "KNACK_API_KEY": API_KEY, "KNACK_API_URL": knack.url,
                "ESB_ENDPOINT": esb.url, "ESB_CERT": str(pki.client_cert), "ESB_KEY": str(pki.client_key),
                "ESB_CA_BUNDLE": str(pki.ca_bundle), "STATE_DIR": str(Path(tmp) / "state"),
            }
            print(f"Knack simulator at {knack.url}, ESB simulator at {esb.url} (mutual TLS, certificates made now)")
            print(f"{len(ACTIVITIES)} activities READY_TO_SEND in {APP}; running:"
                  f" python send_esb_message.py {APP}\n")
            run = subprocess.run([sys.executable, str(PROJECT_ROOT / "send_esb_message.py"), APP], env=env,
                                 cwd=tmp, capture_output=True, text=True, timeout=300)
            sys.stdout.write(run.stdout)
            sys.stderr.write(run.stderr)
            print(f"\nexit code {run.returncode}")

            print(f"\nThe ESB received {len(esb.accepted)} message(s), in this order:")
            for received in esb.accepted:
                m = parse_message(received.body)
                print(f"  id={m['id']} sr={m['sr_number']} code={m['activity_type_code']} "
                      f"status={m['issue_status_code']} date={m['activity_date']}")
                print(textwrap.indent(f"details: {m['activity_details']!r}", "      "))
            shown = [r for r in esb.accepted if r.record_id == f"64b0{505:020d}"]
            if shown:
                print("\nActivity 505 as it went on the wire "
                      "(plain ASCII; the non-ASCII text as character references):")
                print(textwrap.indent(shown[0].body.decode("ascii"), "  "))

            status_key = config["fields"]["esb_status"]
            print("Knack now says:")
            atd_key = config["fields"]["atd_activity_id"] + "_raw"
            for record in sorted(knack.records(config["obj"]), key=lambda r: r[atd_key]):
                print(f"  activity {record[atd_key]}: {record[status_key + '_raw']}")

    expected = run.returncode == 1 and len(esb.accepted) == 7
    print("\nAs designed: activity 506 ('Repaint Crosswalk') has no 311 code, so it failed and stays READY_TO_SEND,"
          "\nand 507 of the same service request waits behind it; the program exits 1 to say so."
          if expected else "\nThe demo did not go as designed: see the output above.")
    return 0 if expected else 1


if __name__ == "__main__":
    sys.exit(main())
