"""Model specifications: what a model accepts, what it outputs, and its pinned weights.

A spec travels with the weights (and into a model registry): the registry picks models by
``modality``/``body_part``, the runtime checks inputs against the input contract, and the
model store resolves each :class:`WeightArtifact` by URL + sha256.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from triage.preprocess.routing import ModelAcceptance
from triage.preprocess.series import SeriesRule


@dataclass(frozen=True)
class WeightArtifact:
    """One pinned weight file.

    Attributes:
        filename: file name inside the model's store folder (``<spec name>/<filename>``).
        url: pinned upstream download URL (immutable: a commit-addressed raw URL).
        sha256: expected SHA-256 of the file, lower-case hex.
    """

    filename: str
    url: str
    sha256: str


@dataclass(frozen=True)
class ModelSpec:
    """What a segmentation model accepts and produces.

    Attributes:
        name: store/registry name, also the store folder (e.g. ``blast-ct-v1``).
        version: version of this model (weights + pre/post-processing).
        accepts: what it reads (modalities, body regions, views) and the series rule that
            picks its series from a study (see ``triage.preprocess.routing``).
        input_spacing_mm: voxel spacing (z, y, x) in mm the input must have.
        intensity_range_hu: HU window (low, high) clipped and mapped onto [-1, 1].
        output_classes: output channel names, in output-index order.
        artifacts: pinned weight files (ensemble members, in member order 1..N).
        licence: SPDX licence identifier of the weights.
        citation: publication to cite.
        source: where the weights come from (repository and commit).
        flag_threshold_ml: default blood volume (ml) at or above which the finding is
            flagged.
        context_voxels: input context the network needs on each side of an output voxel.
        tile_multiple: output tile sides must be multiples of this.
        member_order: ensemble members (1-based) in order of preference; asking for n
            members uses the first n. Empty means 1, 2, ..., N.
    """

    name: str
    version: str
    accepts: ModelAcceptance
    input_spacing_mm: tuple[float, float, float]
    artifacts: tuple[WeightArtifact, ...]
    licence: str
    citation: str
    source: str
    flag_threshold_ml: float
    intensity_range_hu: tuple[float, float] = (-15.0, 100.0)
    output_classes: tuple[str, ...] = ("background", "IPH", "EAH", "oedema", "IVH")
    context_voxels: int = 40
    tile_multiple: int = 5
    member_order: tuple[int, ...] = ()

    def artifact(self, member: int) -> WeightArtifact:
        """The weight file of ensemble member ``member`` (1-based)."""
        if not 1 <= member <= len(self.artifacts):
            raise ValueError(f"{self.name} has members 1..{len(self.artifacts)}, not {member}")
        return self.artifacts[member - 1]

    def first_members(self, n: int) -> tuple[int, ...]:
        """The ``n`` preferred ensemble members (1-based numbers)."""
        if not 1 <= n <= len(self.artifacts):
            raise ValueError(f"members must be in 1..{len(self.artifacts)}, got {n}")
        order = self.member_order or tuple(range(1, len(self.artifacts) + 1))
        return order[:n]

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (for registries and result provenance)."""
        doc = asdict(self)
        doc["accepts"] = self.accepts.to_json()
        result: dict[str, Any] = json.loads(json.dumps(doc))  # tuples become lists
        return result


_BLAST_CT_COMMIT = "549168693c76638dfe6690164ec1aba1c0fdf625"
_BLAST_CT_URL = (
    "https://raw.githubusercontent.com/biomedia-mira/blast-ct/"
    f"{_BLAST_CT_COMMIT}/blast_ct/examples/saved_models/model_{{n}}.pt"
)
_BLAST_CT_SHA256 = (
    "95f76e8b16fe42b6aa49388cb798e282c55cd70191544f4417445bb87803f99f",
    "44621a70866c5d4a69a2011f258d2c2f17d86af047d384f858a74ae0151e149c",
    "58c82cf9fa984266ffe56866e569241dfe41726f61101df963260da45fa4d120",
    "b4d344dfeda52a190280bef76bd0719744a8ce01e735d01fcd4e3fe1d8d04609",
    "5789d5d98f5a4507ffa5edec205026a26570a0444f09272de6dc06cdede92a99",
    "5dc30c4008b2ba6c76934ddef23db76cba962f76ce1c052ca067b94f187e0477",
    "af54c424b97f8dc4c62fe8c33af55d886d2dd444f4b55e9cab50f49af4084b86",
    "8f5d5a48c382300646517049c6b87ae3074a91ae0c7a85d292998272673d876e",
    "a255de8d04b670cbcbd0eda7c8bb7baf25d4a48a8606458000694b5062d7674c",
    "7bb4643c1317e6d5b7dbcbf44669d5653d3ae3d2f01a04a22f3b2f84416dbc05",
    "4a9e432244cf6c082f71b834b1aca6e6b9d44f514f2e52f07edd2f2802674121",
    "1d567f0ec5f1888b5ce6660314db9c51af9758c861f66f001c980f46fe6f49b3",
)

#: BLAST-CT v1: 12-member ensemble segmenting IPH, EAH, perilesional oedema and IVH on
#: non-contrast head CT (Monteiro et al. 2020). See docs/models/blast-ct-v1.md.
BLAST_CT_V1 = ModelSpec(
    name="blast-ct-v1",
    version="1.0.0",
    accepts=ModelAcceptance(
        modalities=("CT",),
        body_regions=("HEAD",),
        series_rule=SeriesRule(
            modalities=("CT",),
            require_image_type=("ORIGINAL", "PRIMARY"),
            exclude_image_type=("LOCALIZER",),
            orientations=("axial",),
            slice_thickness_mm=(0.4, 6.0),
            min_coverage_mm=90.0,
            min_images=8,
            exclude_contrast=True,
            exclude_words=(
                "CTA",
                "ANGIO*",
                "PERFUSION",
                "PERF",
                "MIP",
                "MINIP",
                "SCOUT",
                "TOPOGRAM",
                "LOCALIZER",
                "SURVIEW",
                "DOSE",
            ),
            # Soft-tissue / brain reconstructions across vendors (GE, Siemens, Philips,
            # Canon): the model was trained on them.
            prefer_kernels=(
                "SOFT",
                "STANDARD",
                "STND",
                "STD",
                "BRAIN",
                "CEREBRUM",
                "H2*",
                "H3*",
                "H4*",
                "HR3*",
                "HR4*",
                "J3*",
                "J4*",
                "Q3*",
                "UA",
                "UB",
                "UC",
                "FC2*",
                "FC6*",
            ),
            # Sharp reconstructions for bone or lung: noise the model never saw.
            avoid_kernels=(
                "BONE",
                "BONEPLUS",
                "LUNG",
                "SHARP",
                "DETAIL",
                "EDGE",
                "H6*",
                "H7*",
                "H8*",
                "HR6*",
                "HR7*",
                "J6*",
                "J7*",
                "YC",
                "YD",
                "YB",
                "FC3*",
                "FC8*",
            ),
            prefer_thickness_mm=1.0,
        ),
    ),
    input_spacing_mm=(1.0, 1.0, 1.0),
    artifacts=tuple(
        WeightArtifact(filename=f"model_{n}.pt", url=_BLAST_CT_URL.format(n=n), sha256=sha256)
        for n, sha256 in enumerate(_BLAST_CT_SHA256, start=1)
    ),
    licence="Apache-2.0",
    citation=(
        "Monteiro M, Newcombe VFJ, Mathieu F, et al. Multiclass semantic segmentation and "
        "quantification of traumatic brain injury lesions on head CT using deep learning: "
        "an algorithm development and multicentre validation study. Lancet Digital Health "
        "2020;2(6):e314-e322."
    ),
    source=f"https://github.com/biomedia-mira/blast-ct (commit {_BLAST_CT_COMMIT})",
    flag_threshold_ml=0.5,
    # Ranked by agreement with the 12-member ensemble (blood-label Dice, mean over the real
    # CQ500-CT-0 series and a 20 ml synthetic bleed); see docs/models/blast-ct-v1.md.
    member_order=(7, 2, 10, 5, 4, 8, 9, 11, 1, 6, 3, 12),
)


#: The models this installation runs, in the order the router considers them.
INSTALLED_MODELS: tuple[ModelSpec, ...] = (BLAST_CT_V1,)
