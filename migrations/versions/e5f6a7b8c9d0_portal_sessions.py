"""portal sessions: the browsers signed in to the portal's pages

Revision ID: e5f6a7b8c9d0
Revises: d4e5f6a7b8c9
Create Date: 2026-12-07 19:00:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = 'e5f6a7b8c9d0'
down_revision = 'd4e5f6a7b8c9'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        'portal_sessions',
        sa.Column('id', sa.String(length=64), nullable=False),
        sa.Column('consumer_id', sa.String(length=40), nullable=False),
        sa.Column('credential_id', sa.String(length=40), nullable=False),
        sa.Column('scopes', sa.JSON(), nullable=False),
        sa.Column('csrf_token', sa.String(length=64), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('expires_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['consumer_id'], ['consumers.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    with op.batch_alter_table('portal_sessions') as batch_op:
        batch_op.create_index(batch_op.f('ix_portal_sessions_consumer_id'), ['consumer_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_portal_sessions_expires_at'), ['expires_at'], unique=False)


def downgrade():
    with op.batch_alter_table('portal_sessions') as batch_op:
        batch_op.drop_index(batch_op.f('ix_portal_sessions_expires_at'))
        batch_op.drop_index(batch_op.f('ix_portal_sessions_consumer_id'))
    op.drop_table('portal_sessions')
