"""De-identification of DICOM data sets for exports (DICOM PS3.15 Annex E), with dicognito.

The maintained library ``dicognito`` does the element work: every UI value except class UIDs
and transfer syntaxes is replaced by a hash of the original, every PN by a dummy name, IDs
(PatientID, AccessionNumber, StudyID, OtherPatientIDs...) by dummies, addresses and
institutions by dummies, and DA/DT (with their TM) are shifted by a fixed offset. What one
dicognito ``Anonymizer`` cannot do alone, and :class:`Deidentifier` adds with the library's
own element handlers (``Anonymizer.add_element_handler``, which run before the defaults):

- **Dates per patient.** An ``Anonymizer`` shifts every data set it sees by the same offset,
  drawn from its seed. The export keeps one ``Anonymizer`` per patient, seeded with
  ``HMAC-SHA256(salt, patient key)``, so a patient keeps one shift across all their studies
  (intervals within a patient are preserved) and two patients differ. The shift is replaced
  by a whole number of days (62 to 729 days back, dicognito's range), so times of day are kept
  and a date without a time moves exactly as much as a date with one.
- **UIDs across patients.** Per-patient seeds would give a UID a different replacement in
  each patient's anonymizer; one ``UIAnonymizer`` seeded from the salt is shared by all of
  them, so one original UID maps to one new UID across the whole export (Study, Series,
  SOP Instance, Frame of Reference, and every ReferencedSOPInstanceUID in any sequence).
- **What the basic profile removes and dicognito keeps**: free text (descriptions,
  comments, patient history: :data:`REMOVED`), private elements, overlays and curves
  (groups 50xx and 60xx), Original/Modified Attributes Sequences, digital signatures;
  PatientBirthDate emptied (dicognito shifts it); identifying file meta (source AE titles).
- **Burned-in annotation.** dicognito's ``BurnedInAnnotationGuard`` refuses a data set whose
  BurnedInAnnotation is YES, and any Secondary Capture unless it says NO
  (:class:`BurnedInAnnotationError`): the header profile cannot clean pixels.
- **A last check**: after de-identification no text or UID element may still equal (or, for
  free text, contain) the data set's original patient name, ID, birth date, other IDs,
  accession number or any original instance UID; one that does is emptied (UIDs remapped)
  and counted.

PatientName and PatientID become the patient's pseudonym (:meth:`Deidentifier.pseudonym`),
the same for every study of the patient within one export (one salt). PatientAge, PatientSex,
PatientSize and PatientWeight are kept (Retain Patient Characteristics Option).
PatientIdentityRemoved is set to YES, DeidentificationMethod and its code sequence name the
profile and options (:data:`METHOD_CODES`), LongitudinalTemporalInformationModified MODIFIED.

The salt is the secret of an export: without it pseudonyms, date shifts and UIDs cannot be
recomputed from identifiers; with it they can (a site may keep it to export increments that
link to earlier ones). It is never written into the output.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import pydicom
from dicognito.anonymizer import Anonymizer
from dicognito.datetimeanonymizer import DateTimeAnonymizer
from dicognito.element_anonymizer import ElementAnonymizer
from dicognito.filters import BurnedInAnnotationGuard
from dicognito.fixedvalueanonymizer import FixedValueAnonymizer
from dicognito.idanonymizer import IDAnonymizer
from dicognito.randomizer import Randomizer
from dicognito.uianonymizer import UIAnonymizer
from dicognito.unwantedelements import UnwantedElementsStripper
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.tag import Tag

LIBRARY: Final = "dicognito"

#: Attributes Annex E's basic profile removes (X) that dicognito leaves: free text,
#: identifying sequences, device serials, signatures and the original values' store.
REMOVED: Final[tuple[str, ...]] = (
    "AcquisitionComments",
    "AcquisitionDeviceProcessingDescription",
    "AdditionalPatientHistory",
    "AdmissionID",
    "AdmittingDiagnosesCodeSequence",
    "AdmittingDiagnosesDescription",
    "Allergies",
    "CassetteID",
    "CommentsOnThePerformedProcedureStep",
    "ContentCreatorIdentificationCodeSequence",
    "DataSetTrailingPadding",
    "DerivationDescription",
    "DetectorID",
    "DeviceSerialNumber",
    "DigitalSignaturesSequence",
    "DischargeDiagnosisDescription",
    "EncryptedAttributesSequence",
    "EthnicGroup",
    "FrameComments",
    "GantryID",
    "IdentifyingComments",
    "ImageComments",
    "ImagePresentationComments",
    "InstitutionCodeSequence",
    "InterpretationText",
    "IssuerOfAdmissionID",
    "LastMenstrualDate",
    "MACParametersSequence",
    "MedicalAlerts",
    "ModifiedAttributesSequence",
    "OperatorIdentificationSequence",
    "OrderCallbackPhoneNumber",
    "OrderEnteredBy",
    "OrderEntererLocation",
    "OriginalAttributesSequence",
    "OtherPatientIDsSequence",
    "PatientBirthTime",
    "PatientComments",
    "PatientInstitutionResidence",
    "PatientPrimaryLanguageCodeSequence",
    "PatientSexNeutered",
    "PatientState",
    "PatientTelecomInformation",
    "PerformedLocation",
    "PerformedProcedureStepDescription",
    "PerformedStationAETitle",
    "PerformedStationName",
    "PerformingPhysicianIdentificationSequence",
    "PersonAddress",
    "PersonTelephoneNumbers",
    "PhysiciansOfRecordIdentificationSequence",
    "PhysiciansReadingStudyIdentificationSequence",
    "PlateID",
    "PregnancyStatus",
    "ProtocolName",
    "ReasonForStudy",
    "ReasonForTheRequestedProcedure",
    "ReferencedPatientAliasSequence",
    "ReferencedPatientSequence",
    "ReferencedPerformedProcedureStepSequence",
    "ReferencedStudySequence",
    "ReferringPhysicianAddress",
    "ReferringPhysicianIdentificationSequence",
    "ReferringPhysicianTelephoneNumbers",
    "RequestAttributesSequence",
    "RequestedContrastAgent",
    "RequestedProcedureDescription",
    "ResponsiblePerson",
    "ScheduledProcedureStepDescription",
    "ScheduledStationAETitle",
    "ScheduledStationName",
    "SeriesDescription",
    "ServiceEpisodeDescription",
    "ServiceEpisodeID",
    "SmokingStatus",
    "SpecialNeeds",
    "StudyComments",
    "StudyDescription",
    "TextComments",
    "TextString",
    "TextValue",
    "VisitComments",
)

#: File meta elements that name the sending site or carry private data.
_META_REMOVED: Final = (
    "SourceApplicationEntityTitle",
    "SendingApplicationEntityTitle",
    "ReceivingApplicationEntityTitle",
    "PrivateInformationCreatorUID",
    "PrivateInformation",
)

#: The profile and options applied, as DeidentificationMethodCodeSequence (CID 7050).
METHOD_CODES: Final = (
    codes.DCM.BasicApplicationConfidentialityProfile,
    codes.DCM.RetainLongitudinalTemporalInformationModifiedDatesOption,
    codes.DCM.RetainPatientCharacteristicsOption,
)

#: The method in words, for a dataset's description (DeidentificationMethod holds a short form).
METHOD_TEXT: Final = (
    "DICOM PS3.15 Annex E Basic Application Confidentiality Profile with the Retain"
    " Longitudinal Temporal Information Modified Dates and Retain Patient Characteristics"
    " options, by dicognito: UIDs remapped consistently across the export; names, IDs,"
    " institutions and addresses replaced by dummies; PatientName and PatientID replaced by a"
    " per-patient pseudonym; dates and date-times shifted back by a secret whole number of"
    " days per patient; patient birth date emptied; free text (descriptions, comments,"
    " history), private elements, overlays, curves and original-attribute sequences removed;"
    " instances that may carry burned-in annotation left out. Pixel data is not altered."
)

_SECONDARY_CAPTURE: Final = "1.2.840.10008.5.1.4.1.1.7"
_MIN_SHIFT_DAYS: Final = 62
_MAX_SHIFT_DAYS: Final = 730
_TEXT_VRS: Final = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_COMPARED_VRS: Final = _TEXT_VRS | {"AE", "DA", "DT", "UI", "UR"}
_IDENTITY_KEYWORDS: Final = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "AccessionNumber",
)


def library_version() -> str:
    """The installed dicognito's version."""
    from dicognito import __version__

    return str(__version__)


def method_values() -> list[str]:
    """DeidentificationMethod values (LO, at most 64 characters each)."""
    return [
        f"{LIBRARY} {library_version()}",
        "PS3.15 E.1 Basic Application Confidentiality Profile",
        "Retain Longitudinal Temporal Info Modified Dates",
        "Retain Patient Characteristics",
    ]


class BurnedInAnnotationError(ValueError):
    """An instance that may carry identifying text in its pixels; it is not exported."""


class _RepeatingGroupStripper(ElementAnonymizer):
    """Removes overlays (60xx) and curves (50xx): Annex E removes their data and comments,
    and an overlay can hold burned-in text."""

    def __call__(self, dataset: Dataset, data_element: DataElement) -> bool:
        if data_element.tag.group & 0xFF00 in (0x5000, 0x6000):
            del dataset[data_element.tag]
            return True
        return False

    def describe_actions(self) -> Iterator[str]:
        yield "Remove overlay (60xx) and curve (50xx) groups"


def _values(element: DataElement) -> list[str]:
    """The element's values as text ([] for binary and numeric values)."""
    value = element.value
    if value is None or isinstance(value, bytes | bytearray):
        return []
    if isinstance(value, MultiValue | list | tuple):
        return [str(v) for v in value if v not in (None, "")]
    text = str(value)
    return [text] if text else []


def _is_replaced_uid(element: DataElement) -> bool:
    """Whether dicognito replaces this UI element (not class UIDs or transfer syntaxes)."""
    keyword = pydicom.datadict.keyword_for_tag(element.tag)
    return element.VR == "UI" and not (
        keyword.endswith("ClassUID") or keyword == "TransferSyntaxUID"
    )


@dataclass(frozen=True)
class _Originals:
    """What must not survive in a data set: exact values and words within free text."""

    exact: frozenset[str]
    words: tuple[str, ...]


def _originals(ds: Dataset) -> _Originals:
    exact: set[str] = set()
    words: set[str] = set()

    def collect(dataset: Dataset, element: DataElement) -> None:
        if _is_replaced_uid(element):
            exact.update(_values(element))
        elif element.keyword in _IDENTITY_KEYWORDS:
            for value in _values(element):
                exact.add(value)
                if element.VR == "PN":
                    words.update(p for p in value.replace("^", " ").split() if len(p) >= 3)
                elif len(value.strip()) >= 4:
                    words.add(value.strip())

    ds.walk(collect)
    _file_meta(ds).walk(collect)
    exact.discard("")
    return _Originals(frozenset(exact), tuple(sorted(w.upper() for w in words)))


class Deidentifier:
    """One export's de-identification (see the module doc).

    Args:
        salt: the export's secret (at least 16 bytes); same salt, same pseudonyms, shifts
            and UIDs.
    """

    def __init__(self, salt: bytes) -> None:
        if len(salt) < 16:
            raise ValueError("the de-identification salt must be at least 16 bytes")
        self._salt = salt
        self._uids = UIAnonymizer(Randomizer(self._seed(b"uid")))
        self._patients: dict[str, tuple[Anonymizer, IDAnonymizer]] = {}

    def _seed(self, *parts: bytes) -> str:
        return hmac.new(self._salt, b"\0".join(parts), hashlib.sha256).hexdigest()

    def _patient(self, patient_key: str) -> tuple[Anonymizer, IDAnonymizer]:
        if patient_key not in self._patients:
            seed = self._seed(b"patient", patient_key.encode("utf-8"))
            anonymizer = Anonymizer(seed=seed)
            days = _MIN_SHIFT_DAYS + int(seed[:16], 16) % (_MAX_SHIFT_DAYS - _MIN_SHIFT_DAYS)
            # add_element_handler puts a handler first: the last added runs first.
            anonymizer.add_element_handler(DateTimeAnonymizer(-24 * days))
            anonymizer.add_element_handler(self._uids)
            anonymizer.add_element_handler(FixedValueAnonymizer("PatientBirthDate", ""))
            anonymizer.add_element_handler(_RepeatingGroupStripper())
            anonymizer.add_element_handler(UnwantedElementsStripper(*REMOVED))
            ids = IDAnonymizer(Randomizer(seed), "", "", "PatientID")
            self._patients[patient_key] = (anonymizer, ids)
        return self._patients[patient_key]

    def uid(self, original: str) -> str:
        """The UID that replaces ``original`` throughout the export."""
        element = DataElement(Tag("SOPInstanceUID"), "UI", original)
        self._uids(Dataset(), element)
        return str(element.value)

    def pseudonym(self, patient_key: str) -> str:
        """The patient's PatientID and PatientName in the export (12 characters A-Z0-9).

        Args:
            patient_key: what identifies the patient at the source (their PatientID, or a
                key of one study when the PatientID is unknown).
        """
        _, ids = self._patient(patient_key)
        element = DataElement(Tag("PatientID"), "LO", patient_key)
        ids(Dataset(), element)
        return str(element.value)

    def deidentify(self, ds: Dataset, *, patient_key: str) -> int:
        """De-identify ``ds`` in place as an instance of the patient ``patient_key``.

        Args:
            ds: a data set read with its file meta (pixel data is left as it is).
            patient_key: see :meth:`pseudonym`.

        Returns:
            How many elements the last check had to clean (0 normally).

        Raises:
            BurnedInAnnotationError: the instance may carry identity in its pixels.
        """
        sop_class = str(ds.get("SOPClassUID", ""))
        assume = "unless-no" if sop_class.startswith(_SECONDARY_CAPTURE) else "if-yes"
        try:
            BurnedInAnnotationGuard(assume, "fail").before_each(ds)
        except ValueError:  # its message names the file: not passed on
            raise BurnedInAnnotationError("the instance may carry burned-in annotation") from None
        originals = _originals(ds)
        anonymizer, _ = self._patient(patient_key)
        ds.remove_private_tags()
        meta = _file_meta(ds)
        for keyword in _META_REMOVED:
            if keyword in meta:
                del meta[keyword]
        anonymizer.anonymize(ds)
        pseudonym = self.pseudonym(patient_key)
        ds.PatientID = pseudonym
        ds.PatientName = pseudonym
        ds.PatientIdentityRemoved = "YES"
        ds.LongitudinalTemporalInformationModified = "MODIFIED"
        ds.DeidentificationMethod = method_values()
        ds.DeidentificationMethodCodeSequence = Sequence([_code_item(c) for c in METHOD_CODES])
        return self._clean_residue(ds, originals)

    def _clean_residue(self, ds: Dataset, originals: _Originals) -> int:
        cleaned = 0
        kept = {Tag("PatientID"), Tag("PatientName")}

        def check(dataset: Dataset, element: DataElement) -> None:
            nonlocal cleaned
            if element.VR not in _COMPARED_VRS or (dataset is ds and element.tag in kept):
                return
            values = _values(element)
            if not values:
                return
            leaked = any(v in originals.exact for v in values) or (
                element.VR in _TEXT_VRS
                and any(w in v.upper() for v in values for w in originals.words)
            )
            if not leaked:
                return
            cleaned += 1
            if element.VR == "UI":
                new = [self.uid(v) for v in values]
                element.value = new if len(new) > 1 else new[0]
            else:
                element.value = ""

        ds.walk(check)
        _file_meta(ds).walk(check)
        return cleaned


def _file_meta(ds: Dataset) -> FileMetaDataset:
    """The data set's file meta, an empty one attached when it has none."""
    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    return ds.file_meta


def _code_item(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item
