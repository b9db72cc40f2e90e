// ES module entry. gateway.js is the one implementation; importing it defines globalThis.PgGateway.
import "./gateway.js";

export const { connect, Gateway, RECONNECT_AFTER } = globalThis.PgGateway;
export default globalThis.PgGateway;
