"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
${imports if imports else ""}
from heimdex_db.online import set_lock_timeout

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}


def upgrade() -> None:
    set_lock_timeout()
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    set_lock_timeout()
    ${downgrades if downgrades else "pass"}
