"""baseline: an empty schema that later migrations build on

Revision ID: a07a2accd75d
Revises:
Create Date: 2026-11-21 07:42:59.114542

"""

# revision identifiers, used by Alembic.
revision = "a07a2accd75d"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    pass


def downgrade():
    pass
