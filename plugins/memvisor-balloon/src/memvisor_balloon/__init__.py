"""memvisor-balloon: memory ballooning for memvisor.

Balloon pages are remapped onto one dedicated zero-filled page per VM, freeing their machine
pages; a guest write to that page means the guest forgot its balloon (reboot, driver reload),
and every balloon page of the VM is reset. Under memory pressure, each VM's balloon target
follows an idle-memory-tax or an MRC-guided policy. docs/balloon.md has the details.
"""

from memvisor_balloon.driver import GuestBalloonDriver
from memvisor_balloon.plugin import BalloonPlugin, VMBalloon
from memvisor_balloon.settings import BalloonSettings

__version__ = "0.1.0"

__all__ = ["BalloonPlugin", "BalloonSettings", "GuestBalloonDriver", "VMBalloon", "__version__"]
