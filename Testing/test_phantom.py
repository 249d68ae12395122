"""Synthetic neck CT phantoms: exact labels, anatomy, site profiles, determinism and files."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from LymphNodeDGSTLib.demo import phantom as phantom_module
from LymphNodeDGSTLib.demo.phantom import nodes as phantom_nodes
from LymphNodeDGSTLib.errors import UserInputError
from LymphNodeDGSTLib.demo.phantom.sites import BONE_TISSUES, SITE_PROFILES, VESSEL_TISSUES, Tissue
from LymphNodeDGSTLib.demo.phantom.nodes import NODE_MARGIN_MM
from LymphNodeDGSTLib.demo.phantom import Phantom, generate_phantom, write_phantoms

SEEDS = (0, 1, 2)


@pytest.fixture(scope="session")  # not module: xdist interleaves modules (re-ran it)
def phantoms() -> dict[tuple[str, int], Phantom]:
    return {(site, seed): generate_phantom(site, seed) for site in SITE_PROFILES for seed in SEEDS}


def _arrays(p: Phantom) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (sitk.GetArrayFromImage(p.image), sitk.GetArrayFromImage(p.label),
            sitk.GetArrayFromImage(p.tissues))


def _voxel_centres_lps(image: sitk.Image) -> np.ndarray:
    """(z, y, x, 3) physical LPS centres of every voxel (identity direction)."""
    axes = [o + s * np.arange(n) for o, s, n in zip(image.GetOrigin(), image.GetSpacing(), image.GetSize())]
    z, y, x = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    return np.stack([x, y, z], axis=-1)


def _distance_mm(structure: np.ndarray, image: sitk.Image) -> np.ndarray:
    """Distance (mm) from each voxel to the nearest voxel of `structure`."""
    return ndimage.distance_transform_edt(~structure, sampling=image.GetSpacing()[::-1])


def test_profiles_differ_the_way_two_sites_do():
    a, b = SITE_PROFILES["A"], SITE_PROFILES["B"]
    assert not a.contrast_enhanced and b.contrast_enhanced
    assert a.slice_thickness_mm == 3.0 and b.slice_thickness_mm == 1.25
    assert a.noise_std_hu < b.noise_std_hu and a.kernel_sigma_mm > b.kernel_sigma_mm
    assert a.hu_offset == 0 and b.hu_offset != 0
    assert a.necrosis_probability == 0 < b.necrosis_probability
    assert a.node_long_axis_range_mm[1] < b.node_long_axis_range_mm[1]
    for p in (a, b):
        assert 0.9 <= p.spacing_xy_mm <= 1.2 and 140 <= p.size_mm[0] <= 170 and 80 <= p.size_mm[2] <= 120
    with pytest.raises(Exception):
        a.noise_std_hu = 1.0  # frozen


def test_image_label_and_tissue_map_share_the_profile_grid(phantoms):
    for (site, _), p in phantoms.items():
        profile = SITE_PROFILES[site]
        assert p.image.GetPixelID() == sitk.sitkInt16
        assert p.label.GetPixelID() == sitk.sitkUInt8
        for other in (p.label, p.tissues):
            assert other.GetSize() == p.image.GetSize() == profile.shape_xyz
            assert other.GetSpacing() == pytest.approx(p.image.GetSpacing())
            assert other.GetOrigin() == pytest.approx(p.image.GetOrigin())
        assert p.image.GetSpacing() == pytest.approx(profile.spacing_mm)
        assert p.image.GetDirection() == pytest.approx(np.eye(3).ravel())
        centre = p.image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in p.image.GetSize()])
        assert np.allclose(centre, 0.0, atol=1e-6)
        assert set(np.unique(sitk.GetArrayFromImage(p.label))) == {0, 1}


def test_label_is_exactly_the_union_of_node_ellipsoids(phantoms):
    for p in phantoms.values():
        _, label, tissues = _arrays(p)
        centres = _voxel_centres_lps(p.label)
        inside_any = np.zeros(label.shape, dtype=bool)
        for node in p.nodes:
            inside_any |= node.contains(centres)
        np.testing.assert_array_equal(label.astype(bool), inside_any)
        np.testing.assert_array_equal(label.astype(bool), np.isin(tissues, (Tissue.NODE, Tissue.NECROSIS)))


def test_each_connected_component_is_one_node(phantoms):
    for p in phantoms.values():
        label = sitk.GetArrayFromImage(p.label)
        components, count = ndimage.label(label, structure=np.ones((3, 3, 3)))
        assert count == len(p.nodes)
        seen = set()
        for node in p.nodes:
            index = p.label.TransformPhysicalPointToIndex(node.center_mm)
            component = components[index[::-1]]
            assert component > 0, "a node's centre voxel is not labelled"
            assert component not in seen
            seen.add(component)
            assert np.sum(components == component) == node.label_voxels
            centres = _voxel_centres_lps(p.label)[components == component]
            assert node.contains(centres).all()


def test_nodes_sit_in_fat_clear_of_spine_airway_and_vessels(phantoms):
    for p in phantoms.values():
        _, label, tissues = _arrays(p)
        node_voxels = label.astype(bool)
        forbidden = np.isin(tissues, (*BONE_TISSUES, Tissue.SPINAL_CANAL, Tissue.AIRWAY,
                                      Tissue.AIRWAY_WALL, *VESSEL_TISSUES))
        assert _distance_mm(forbidden, p.label)[node_voxels].min() > NODE_MARGIN_MM
        outside = np.isin(tissues, (Tissue.AIR, Tissue.SKIN))
        assert _distance_mm(outside, p.label)[node_voxels].min() > NODE_MARGIN_MM
        for node in p.nodes:  # lateral, never in the midline with the airway and spine
            assert abs(node.center_mm[0]) > 15.0


def test_node_count_sizes_and_necrosis_follow_the_profile(phantoms):
    for (site, _), p in phantoms.items():
        profile = SITE_PROFILES[site]
        low, high = profile.node_count_range
        assert low <= len(p.nodes) <= high
        for node in p.nodes:
            lo, hi = profile.node_long_axis_range_mm
            assert lo - 1e-9 <= node.long_axis_mm <= hi + 1e-9
            semi = np.asarray(node.semi_axes_mm)
            assert np.all(np.diff(semi) <= 0)
            ratio_lo, ratio_hi = profile.node_short_to_long_ratio_range
            assert ratio_lo - 1e-9 <= semi[2] / semi[0] <= ratio_hi + 1e-9
            assert np.allclose(np.asarray(node.axes) @ np.asarray(node.axes).T, np.eye(3), atol=1e-9)
            assert node.label_voxels >= 1
            if node.necrotic:
                assert node.long_axis_mm >= phantom_nodes.NECROSIS_MIN_LONG_AXIS_MM
    assert not any(n.necrotic for (site, _), p in phantoms.items() if site == "A" for n in p.nodes)
    necrotic_b = [p for (site, _), p in phantoms.items() if site == "B" if any(n.necrotic for n in p.nodes)]
    assert necrotic_b, "site B should draw some necrotic nodes"
    for p in necrotic_b:  # the label covers the necrotic centre
        _, label, tissues = _arrays(p)
        assert (tissues == Tissue.NECROSIS).any()
        assert np.all(label[tissues == Tissue.NECROSIS] == 1)


def test_tissue_intensities_are_ct_like(phantoms):
    artery_mean = {}
    for (site, seed), p in phantoms.items():
        profile = SITE_PROFILES[site]
        image, label, tissues = _arrays(p)
        image = image.astype(float) - profile.hu_offset
        far_outside = _distance_mm(tissues != Tissue.AIR, p.image) > 5.0
        assert image[far_outside].mean() == pytest.approx(-1000.0, abs=10.0)
        assert image[far_outside].std() == pytest.approx(profile.noise_std_hu, rel=0.3)
        assert image[np.isin(tissues, BONE_TISSUES)].mean() > 300.0
        assert image[tissues == Tissue.AIRWAY].mean() < -500.0
        assert -130.0 < image[tissues == Tissue.FAT].mean() < -50.0
        node_voxels = tissues == Tissue.NODE
        node_centres, node_values = _voxel_centres_lps(p.label)[node_voxels], image[node_voxels]
        for node in p.nodes:  # node centres (away from partial volume with fat) read as soft tissue
            core = node.contains(node_centres, scale=0.5)
            if node.short_axis_mm >= 2 * profile.slice_thickness_mm and core.any():
                assert 0.0 < node_values[core].mean() < 90.0
        artery_mean[site, seed] = image[tissues == Tissue.ARTERY].mean()
    for seed in SEEDS:
        assert artery_mean["A", seed] < 90.0  # unenhanced blood
        assert artery_mean["B", seed] > artery_mean["A", seed] + 100.0


def test_same_seed_same_phantom_and_other_seed_differs(phantoms):
    again = generate_phantom("B", 1)
    first = phantoms["B", 1]
    for a, b in zip(_arrays(again), _arrays(first)):
        np.testing.assert_array_equal(a, b)
    assert [n.to_dict() for n in again.nodes] == [n.to_dict() for n in first.nodes]
    other = phantoms["B", 2]
    assert not np.array_equal(_arrays(other)[0], _arrays(first)[0])
    assert not np.array_equal(_arrays(other)[1], _arrays(first)[1])


def test_generation_is_fast():
    for site in SITE_PROFILES:
        start = time.process_time()
        generate_phantom(site, 7)
        assert time.process_time() - start < 2.0


def test_written_files_read_back_with_their_geometry_and_manifest(tmp_path):
    out = tmp_path / "phantoms"
    pairs = write_phantoms(out, "B", 2, 5)
    assert [(i.name, l.name) for i, l in pairs] == [
        ("siteB_s0005_ct.nii.gz", "siteB_s0005_label.nii.gz"),
        ("siteB_s0006_ct.nii.gz", "siteB_s0006_label.nii.gz"),
    ]
    expected = generate_phantom("B", 6)
    image, label = sitk.ReadImage(str(pairs[1][0])), sitk.ReadImage(str(pairs[1][1]))
    assert image.GetPixelID() == sitk.sitkInt16 and label.GetPixelID() == sitk.sitkUInt8
    for read, made in ((image, expected.image), (label, expected.label)):
        assert read.GetSpacing() == pytest.approx(made.GetSpacing(), abs=1e-5)
        assert read.GetOrigin() == pytest.approx(made.GetOrigin(), abs=1e-4)
        assert read.GetDirection() == pytest.approx(made.GetDirection(), abs=1e-6)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(made))

    write_phantoms(out, "A", 1, 0)  # a second run adds to the manifest
    manifest = json.loads((out / "phantoms.json").read_text())
    assert manifest["synthetic"] is True
    assert [(e["site"], e["seed"]) for e in manifest["phantoms"]] == [("A", 0), ("B", 5), ("B", 6)]
    entry = manifest["phantoms"][2]
    assert entry["image"] == "siteB_s0006_ct.nii.gz" and entry["label"] == "siteB_s0006_label.nii.gz"
    assert len(entry["nodes"]) == len(expected.nodes)
    assert entry["nodes"][0]["center_mm"] == pytest.approx(list(expected.nodes[0].center_mm))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["phantoms.json", "siteA_s0000_ct.nii.gz", "siteA_s0000_label.nii.gz",
         *[p.name for pair in pairs for p in pair]])


def test_bad_site_seed_or_count_is_a_user_error(tmp_path):
    with pytest.raises(UserInputError, match="known sites: A, B, C"):
        generate_phantom("D", 0)
    with pytest.raises(UserInputError, match="seed"):
        generate_phantom("A", -1)
    out = tmp_path / "never"
    for n in (0, -3, 1.5, "2", True):
        with pytest.raises(UserInputError, match="number of phantoms"):
            write_phantoms(out, "A", n, 0)
    with pytest.raises(UserInputError, match="known sites"):
        write_phantoms(out, "a", 1, 0)
    assert not out.exists()


def test_unreadable_manifest_is_refused_before_writing(tmp_path):
    (tmp_path / "phantoms.json").write_text("{not json")
    with pytest.raises(UserInputError, match="not a phantom manifest"):
        write_phantoms(tmp_path, "A", 1, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phantoms.json"]


def test_interrupted_write_leaves_no_half_written_file(tmp_path, monkeypatch):
    def failing_writer(image, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"half a volume")
        raise KeyboardInterrupt

    monkeypatch.setattr(phantom_module.sitk, "WriteImage", failing_writer)
    with pytest.raises(KeyboardInterrupt):
        write_phantoms(tmp_path, "A", 1, 0)
    assert list(tmp_path.iterdir()) == []


def test_site_c_nodes_are_rim_enhancing_flat_rings_brighter_than_muscle(phantoms):
    """The harder shift: every site-C node has a bright wall around a fluid centre, so the node
    wall reads above muscle (site A: below) and a node is a ring, not a blob.

    Mutation caught: a site C that only changes the scanner (B's node pattern)."""
    for (site, _), p in phantoms.items():
        if site not in ("A", "C"):
            continue
        image, _, tissues = _arrays(p)
        wall, centre = image[tissues == Tissue.NODE].mean(), image[tissues == Tissue.NECROSIS]
        muscle = image[tissues == Tissue.MUSCLE].mean()
        if site == "A":
            assert wall < muscle
            continue
        assert all(node.necrotic for node in p.nodes) and p.nodes
        low, high = SITE_PROFILES["C"].necrosis_scale_range
        assert all(low <= node.necrosis_scale <= high for node in p.nodes)
        assert wall > muscle + 40.0
        assert centre.mean() < muscle


def test_this_module_runs_as_one_xdist_group(request):
    """Catches --dist loadgroup silently not grouping (pytest 9.2 with pytest-xdist 3.8): the
    grouped modules' session fixtures (a benchmark run, a DDP run, the phantoms) then ran once per
    worker. Under loadgroup xdist tags a grouped test's node id with "@group"."""
    if getattr(request.config.option, "loadgroup", False):  # set on xdist's workers
        assert request.node.nodeid.endswith("@test_phantom.py"), request.node.nodeid

