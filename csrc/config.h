/* config.h - validation and resolution of apex_config and of attention
 * options (internal). */
#ifndef APEX_CSRC_CONFIG_H
#define APEX_CSRC_CONFIG_H

#include "apex/apex.h"

/* Bytes of one block of one layer for this geometry. */
size_t apex_config_block_bytes(const apex_config *c);

/* Checks every field; APEX_ERR_INVALID_ARG / APEX_ERR_UNSUPPORTED with a
 * message naming the field. */
apex_status apex_config_validate(const apex_config *c);

/* host_blocks 0 means "size the host tier from APEX_HOST_KV_GB" (default
 * 2 GiB of KV over all layers); returns the block count to use. */
int64_t apex_config_host_blocks(const apex_config *c);

/* Attention options (shared by apex_attention and the paged ABI): opts, or
 * the defaults of a context of this (resolved) config, into *o, checked
 * (dtypes, finite non-negative scale/softcap/window), scale 0 resolved to
 * 1/sqrt(head_dim). fn names the caller in the message. */
apex_status apex_attn_opts_resolve(const apex_config *cfg, const char *fn,
                                   const apex_attn_opts *opts, apex_attn_opts *o);

#endif
