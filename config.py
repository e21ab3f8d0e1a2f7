"""Knack apps whose 311 activities this bridge sends to the ESB.

One entry per app, keyed by the name given on the command line:
  obj             Knack object that holds the activity records (the status update goes there)
  view            Knack view that exposes the records to process (records are read through it)
  fields          template variable -> Knack field key ("id" is the Knack record id itself)
  activity_codes  optional: activity name -> 311 CSR activity code; None means "not for 311"
                  (the record is set DO_NOT_SEND and no message goes)
  timezone        optional: IANA zone name that overrides the app's timezone from the Knack metadata
See README.md for the meaning of every key.
"""

CONFIG = {
    "data-tracker": {
        "obj": "object_75",
        "view": "view_1653",
        "fields": {
            "id": "id",
            "atd_activity_id": "field_1051",
            "emi_id": "field_1868",
            "sr_number": "field_1232",
            "issue_status_code_snapshot": "field_1874",
            "esb_status": "field_1860",
            "activity_datetime": "field_1054",
            "activity_details": "field_1055",
            "activity_name": "field_1053",
            "csr_activity_id": "field_4583",
            "csr_activity_code": "field_4582",
        },
        "activity_codes": {
            "Identify Asset": "IDENASSE",
            "Dispatch Technician": "DISPTECH",
            "Close Issue (Resolved)": "CLOIS001",
            "Adjust Timing": "ADJUTIMI",
            "Complete Repairs": "REPACOMP",
            "Assign to Signal Request Review": "ASSIRERE",
            "Assign to Signal Engineering": "ASTOSIEN",
            "Assign to TMC": "RETOMOMC",
            "Monitor in School Zone Beacon System": "MONISSRE",
            "Monitor Situation on CCTV": "MONISSRE",
            "311 Feedback": "311FEEDB",
            "Monitor Situation in KITS": "MONISSRE",
            "Close Issue (Duplicate)": "CLOIS001",
            "Remote Monitor Reset - Successful": "REMORESU",
            "Remote Monitor Reset - Unsuccessful": "REMOR001",
            "Adjust Video Detection": "ADJVIDDE",
            "Coordinate Internally/Externally": "COORINTE",
            # internal activities that 311 does not want
            "Other": None,
            "Storm-Related": None,
            "Attach Image": None,
            "Post Tweet": None,
            "Update DMS": None,
            "Send Email": None,
        },
    },
    "signs-markings": {
        "obj": "object_173",
        "view": "view_3052",
        "fields": {
            "atd_activity_id": "field_3143",
            "emi_id": "field_3163",
            "sr_number": "field_3154",
            "issue_status_code_snapshot": "field_3160",
            "esb_status": "field_3164",
            "activity_datetime": "field_3145",
            "activity_details": "field_3147",
            "activity_name": "field_3144",
            "csr_activity_id": "field_4321",
            "csr_activity_code": "field_4322",
            "id": "id",
        },
        "activity_codes": {
            "Conduct Investigation": "TMCONINV",
            "Contact Citizen": "CONTACT",
            "Dispatch Technician/Crew": "DISPATC2",
            "Repair/Replace": "TRREPSGN",
            "Send Email": "CONTACT",
            "Close Issue (Duplicate)": "CLOIS001",
            "Close Issue (Resolved)": "CLOIS001",
            "311 Feedback": "311FEEDB",
            # internal activities that 311 does not want
            "Attach Image": None,
            "Other": None,
        },
    },
}
