"""Device capacities: tiers of model sizes, how clients are assigned to them, and availability."""

from fedhet.devices.availability import Availability
from fedhet.devices.tiers import LETTER_WIDTHS, Tier, assign_tiers, largest, parse_tiers, smallest

__all__ = ["LETTER_WIDTHS", "Availability", "Tier", "assign_tiers", "largest", "parse_tiers", "smallest"]
