"""Backend health as a pure state machine, HAProxy's rise/fall counter.

`health` runs from 0 to rise + fall - 1 and the backend is UP while health >= rise.
A passing check raises it by one (up to the top); a failing check lowers it by one while
it is above `rise`, and otherwise drops it to 0: the backend goes DOWN. A backend starts
at health = rise: UP, but one failure from DOWN until `fall - 1` checks have confirmed
it (HAProxy's start-up rule). Maintenance stops checks; leaving it starts over.

The state shown to operators combines this with the admin state (lb.model.backend_state).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class CheckState:
    rise: int
    fall: int
    health: int

    @classmethod
    def initial(cls, rise: int, fall: int) -> CheckState:
        return cls(rise, fall, rise)

    @property
    def up(self) -> bool:
        return self.health >= self.rise

    def passed(self) -> CheckState:
        top = self.rise + self.fall - 1
        return replace(self, health=min(self.health + 1, top))

    def failed(self) -> CheckState:
        if self.health > self.rise:
            return replace(self, health=self.health - 1)
        return replace(self, health=0)

    def observe(self, ok: bool) -> CheckState:
        return self.passed() if ok else self.failed()

    def retune(self, rise: int, fall: int) -> CheckState:
        """New rise/fall from a reload: keep UP or DOWN as it is."""
        if self.up:
            return CheckState(
                rise, fall, min(max(rise, self.health - self.rise + rise), rise + fall - 1)
            )
        return CheckState(rise, fall, min(self.health, rise - 1))
