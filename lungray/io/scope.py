"""Which objects a frontal chest model may score, judged from the header before any pixel decode.

A CT slice, a knee film or a lateral chest view scored by a frontal chest model is a
confident wrong answer on the worklist. Such objects become `skipped` rows with the
reason instead: one row each, no probability, never flagged.

The check reads three header fields, as `header_metadata` names them in the metadata
dict: `modality` (Modality), `body_part` (BodyPartExamined), `view_position`
(ViewPosition). A field the header lacks is in scope (many CR/DX films leave
BodyPartExamined empty), and so are PNG and JPEG files, which have no header at all.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

ANY = "any"
# setting name (the --scope key) -> (metadata key, DICOM keyword, for the reason)
CHECKED_FIELDS = {
    "modality": ("modality", "Modality"),
    "body_part": ("body_part", "BodyPartExamined"),
    "view": ("view_position", "ViewPosition"),
}
CODE_STRING = re.compile(r"[A-Z0-9 _]{1,16}")  # DICOM CS: what a well-formed value can hold


def normalise(value: Any) -> str | None:
    text = str(value).strip().upper() if value is not None else ""
    return text or None


@dataclass(frozen=True)
class Scope:
    """Accepted values of each checked field; None accepts any value."""

    modality: tuple[str, ...] | None = ("CR", "DX")
    body_part: tuple[str, ...] | None = ("CHEST", "THORAX", "LUNG")
    view: tuple[str, ...] | None = ("PA", "AP")

    def __post_init__(self) -> None:
        for setting in fields(self):
            values = getattr(self, setting.name)
            if values is not None:
                accepted = tuple(dict.fromkeys(filter(None, map(normalise, values))))
                if not accepted:
                    raise ValueError(f"scope {setting.name} accepts no value; give values or {ANY!r}")
                object.__setattr__(self, setting.name, accepted)

    @classmethod
    def from_settings(cls, settings: Iterable[str]) -> Scope:
        """`KEY=V1,V2` or `KEY=any` per setting (KEY: modality, body_part, view); unnamed keys keep their defaults."""
        changes: dict[str, tuple[str, ...] | None] = {}
        for setting in settings:
            key, sep, values = setting.partition("=")
            key = key.strip().lower().replace("-", "_")
            if not sep or key not in CHECKED_FIELDS:
                raise ValueError(f"scope setting {setting!r}: expected KEY=VALUES with KEY one of {', '.join(CHECKED_FIELDS)}")
            changes[key] = None if values.strip().lower() == ANY else tuple(values.split(","))
        return replace(cls(), **changes)


# The DICOM Defined Terms of each checked field: what `--pseudonymize` lets through of its value,
# in the columns and in a skip reason. Other values (site-local terms, and whatever a damaged or
# misused header holds: a name or an MRN is a valid code string too) become OTHER_VALUE.
DEFINED_TERMS = {
    # PS3.3 C.7.3.1.1.1 Modality, current and retired Defined Terms.
    "modality": frozenset(
        "ANN AR ASMT AU BDUS BI BMD CFM CR CT CTPROTOCOL DG DMS DOC DX ECG EEG EMG EOG EPS ES FID GM HC HD IO IOL "
        "IVOCT IVUS KER KO LEN LS M3D MG MR NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PA PLAN POS PR PT PX REG "
        "RESP RF RG RTDOSE RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF STAIN "
        "TEXTUREMAP TG US VA XA XAPROTOCOL XC "
        "AS CD CF CP CS DD DF DM DS EC FA FS LP MA MS OPR ST VF".split()
    ),
    # PS3.16 Annex L, Body Part Examined Defined Terms (the commoner regions), and THORAX, which
    # many chest units write.
    "body_part": frozenset(
        "ABDOMEN ABDOMENPELVIS ADRENAL ANKLE AORTA ARM AXILLA BACK BLADDER BRAIN BREAST BRONCHUS BUTTOCK CALCANEUS "
        "CALF CAROTID CEREBELLUM CERVIX CHEEK CHEST CHESTABDOMEN CHESTABDPELVIS CIRCLEOFWILLIS CLAVICLE COCCYX COLON "
        "CORNEA CORONARYARTERY CSPINE CTSPINE DUODENUM EAR ELBOW ESOPHAGUS EXTREMITY EYE EYELID FACE FEMUR FINGER "
        "FOOT FOREARM GALLBLADDER HAND HEAD HEADNECK HEART HIP HUMERUS IAC ILEUM ILIUM JAW JEJUNUM KIDNEY KNEE "
        "LARYNX LEG LIVER LSPINE LSSPINE LUNG MAXILLA MEDIASTINUM MOUTH NECK NECKCHEST NECKCHESTABDOMEN "
        "NECKCHESTABDPELV NOSE ORBIT OVARY PANCREAS PAROTID PATELLA PELVIS PENIS PHARYNX PROSTATE RADIUS RECTUM RIB "
        "SCALP SCAPULA SCLERA SCROTUM SHOULDER SKULL SPINE SPLEEN SSPINE STERNUM STOMACH SUBMANDIBULAR TESTIS THIGH "
        "THORAX THUMB THYMUS THYROID TLSPINE TMJ TOE TONGUE TRACHEA TSPINE ULNA URETER URETHRA UTERUS VAGINA VULVA "
        "WHOLEBODY WRIST ZYGOMA".split()
    ),
    # PS3.3 C.8.11.5.1.1 (DX) and C.8.1.1 (CR) View Position.
    "view": frozenset("AP PA LL RL RLD LLD RLO LLO".split()),
}
OTHER_VALUE = "<other value>"
REASON = re.compile(r"out of scope: (?P<keyword>\w+) (?P<value>.*?) is not one of (?P<accepted>.*)")
SETTING_OF_KEYWORD = {keyword: setting for setting, (_, keyword) in CHECKED_FIELDS.items()}
SETTING_OF_COLUMN = {meta_key: setting for setting, (meta_key, _) in CHECKED_FIELDS.items()}


def defined_term(setting: str, value: Any) -> str | None:
    """The field's value if it is one of its DICOM Defined Terms (normalised), else OTHER_VALUE; None stays None."""
    term = normalise(value)
    return term if term is None or term in DEFINED_TERMS[setting] else OTHER_VALUE


def with_defined_terms(column: str, values: list[Any]) -> list[str | None]:
    """A checked column (`modality`, `body_part`, `view_position`) as `--pseudonymize` writes it."""
    return [defined_term(SETTING_OF_COLUMN[column], value) for value in values]


def reason_with_defined_terms(reason: str | None) -> str | None:
    """A skip reason as `--pseudonymize` writes it: the header's value only if it is a Defined Term."""
    match = REASON.fullmatch(reason) if reason else None
    if match is None or match["keyword"] not in SETTING_OF_KEYWORD:
        return reason
    value = defined_term(SETTING_OF_KEYWORD[match["keyword"]], match["value"])
    return f"out of scope: {match['keyword']} {value} is not one of {match['accepted']}"


def shown(value: str) -> str:
    """A header value as the reason shows it: code strings as they are, anything else not at all
    (a damaged header can put any text, a name included, where a code string belongs)."""
    return value if CODE_STRING.fullmatch(value) else "<not a code string>"


def skip_reason(meta: Mapping[str, Any], scope: Scope) -> str | None:
    """Why the object described by `meta` is out of `scope`, or None when it may be scored."""
    for setting, (meta_key, keyword) in CHECKED_FIELDS.items():
        accepted = getattr(scope, setting)
        value = normalise(meta.get(meta_key))
        if accepted is not None and value is not None and value not in accepted:
            return f"out of scope: {keyword} {shown(value)} is not one of {','.join(accepted)}"
    return None
