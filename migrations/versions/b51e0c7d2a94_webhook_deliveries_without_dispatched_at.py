"""webhook deliveries without dispatched_at

Workers claim batches of due deliveries themselves (app.webhooks.attempts.claim), so no row
records when a message was sent for it any more.

Revision ID: b51e0c7d2a94
Revises: 759f2658c6ee
Create Date: 2026-12-07 10:05:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = 'b51e0c7d2a94'
down_revision = '759f2658c6ee'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('webhook_deliveries') as batch_op:
        batch_op.drop_column('dispatched_at')


def downgrade():
    with op.batch_alter_table('webhook_deliveries') as batch_op:
        batch_op.add_column(sa.Column('dispatched_at', sa.DateTime(), nullable=True))
