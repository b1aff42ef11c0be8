/*
 * The libmilter baseline of benches/milter.rs: a milter that registers the
 * stages dualroute uses and, at end of message, does what dualroute does
 * for one redirected recipient (delete it, add its relay address with
 * ESMTP parameters, add the loop header). Built by scripts/bench.sh from
 * Debian's libmilter-dev:
 *
 *   cc -O2 -o noop-libmilter benches/noop-libmilter.c -lmilter -lpthread
 *   noop-libmilter unix:/path/to/socket
 */
#include <libmilter/mfapi.h>
#include <stdio.h>
#include <stdlib.h>

static sfsistat on_connect(SMFICTX *ctx, char *host, _SOCK_ADDR *addr)
{
    (void) ctx; (void) host; (void) addr;
    return SMFIS_CONTINUE;
}

static sfsistat on_mail(SMFICTX *ctx, char **argv)
{
    (void) ctx; (void) argv;
    return SMFIS_CONTINUE;
}

static sfsistat on_rcpt(SMFICTX *ctx, char **argv)
{
    (void) ctx; (void) argv;
    return SMFIS_CONTINUE;
}

static sfsistat on_header(SMFICTX *ctx, char *name, char *value)
{
    (void) ctx; (void) name; (void) value;
    return SMFIS_CONTINUE;
}

static sfsistat on_eom(SMFICTX *ctx)
{
    if (smfi_delrcpt(ctx, "<zed@bench.test>") != MI_SUCCESS
        || smfi_addrcpt_par(ctx, "<zed@bench.test.dualroute.invalid>",
                            "ORCPT=rfc822;zed@bench.test") != MI_SUCCESS
        || smfi_addheader(ctx, "X-Dualroute", "bench.test") != MI_SUCCESS)
        return SMFIS_TEMPFAIL;
    return SMFIS_CONTINUE;
}

static sfsistat on_abort(SMFICTX *ctx)
{
    (void) ctx;
    return SMFIS_CONTINUE;
}

int main(int argc, char **argv)
{
    struct smfiDesc desc = {
        "noop-libmilter", SMFI_VERSION,
        SMFIF_ADDHDRS | SMFIF_ADDRCPT | SMFIF_ADDRCPT_PAR | SMFIF_DELRCPT,
        on_connect, NULL, on_mail, on_rcpt, on_header, NULL, NULL,
        on_eom, on_abort, NULL, NULL, NULL, NULL,
    };
    if (argc != 2) {
        fprintf(stderr, "usage: %s unix:/path | inet:port@host\n", argv[0]);
        return 2;
    }
    if (smfi_setconn(argv[1]) != MI_SUCCESS || smfi_register(desc) != MI_SUCCESS) {
        fprintf(stderr, "%s: cannot set up %s\n", argv[0], argv[1]);
        return 1;
    }
    return smfi_main() == MI_SUCCESS ? 0 : 1;
}
