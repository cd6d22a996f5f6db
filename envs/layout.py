"""Where things are in the table-top scene. Kept free of robosuite imports so that tasks, listings and
argument checks can use these numbers without loading the simulator."""

TABLE_FULL_SIZE = (0.8, 1.2, 0.05)
TABLE_OFFSET = (0.0, 0.0, 0.8)
TABLE_TOP_Z = TABLE_OFFSET[2]
CONTROL_FREQ = 20
FRONT_CAMERA = "front"
FRONT_CAMERA_POS = (0.75, 0.0, 1.5)
FRONT_CAMERA_QUAT = (0.6395, 0.3018, 0.3018, 0.6395)  # wxyz: looks at (-0.1, 0, 0.8), the workspace centre
WRIST_CAMERA = "robot0_eye_in_hand"
WRIST_CAMERA_LEFT = "robot1_eye_in_hand"  # the second arm's wrist camera (bimanual tasks)
BIMANUAL_Y_OFFSETS = (-0.2, 0.2)  # robot 0 on the right (-y), robot 1 on the left (+y), both facing +x
