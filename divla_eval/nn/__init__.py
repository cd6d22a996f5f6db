"""Neural-network pieces shared by the learned policies (DiVLA and the baselines). Its modules import
torch, so the harness modules never import them at top level; this file itself does not, so that the
torch-free configs can share `norm_groups` with the layers they describe."""


def norm_groups(channels: int) -> int:
    """GroupNorm groups for an image-encoder layer: one per 16 channels, as the paper's ResNet."""
    return max(1, channels // 16)


def check_group_channels(label: str, channels: tuple[int, ...]) -> None:
    """Each of an image encoder's `channels` must split into its `norm_groups` (GroupNorm's rule);
    `label` names the config field in the error."""
    for c in channels:
        if c % norm_groups(c):
            raise ValueError(f"{label} {c}: must be below 16 or a multiple of {norm_groups(c)}")


def check_keypoint_path(field: str, keypoints: int, channels: tuple[int, ...]) -> None:
    """The options of the optional keypoint path DiVLA, Octo and OpenVLA share (`nn.keypoints`):
    `field` is the config's keypoint count (0: no path), `channels` its `keypoint_channels`."""
    if keypoints < 0:
        raise ValueError(f"{field} must be >= 0, got {keypoints}")
    if not channels:
        raise ValueError("keypoint_channels needs at least one entry")
    check_group_channels("keypoint_channels", channels)
