"""webhook deliveries claimed in batches: no dispatched_at, an index for each endpoint's due range

Workers claim batches of due deliveries themselves (app.webhooks.attempts.claim), so no row
records when a message was sent for it any more; a claim reads each endpoint's oldest due
deliveries, an index range on (endpoint_id, status, next_attempt_at, id) that also serves the
(endpoint_id, status) lookups the index it replaces did.

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
        batch_op.drop_index('ix_webhook_deliveries_endpoint_status')
        batch_op.create_index('ix_webhook_deliveries_endpoint_status_due', ['endpoint_id', 'status', 'next_attempt_at', 'id'], unique=False)


def downgrade():
    with op.batch_alter_table('webhook_deliveries') as batch_op:
        batch_op.drop_index('ix_webhook_deliveries_endpoint_status_due')
        batch_op.create_index('ix_webhook_deliveries_endpoint_status', ['endpoint_id', 'status'], unique=False)
        batch_op.add_column(sa.Column('dispatched_at', sa.DateTime(), nullable=True))
