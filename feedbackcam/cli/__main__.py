"""``python -m feedbackcam.cli`` (also under ``torchrun``)."""

import sys

from . import main

sys.exit(main())
